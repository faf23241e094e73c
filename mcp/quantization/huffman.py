"""Canonical Huffman coding of integer symbol streams, with a real encoder and decoder.

The code table is stored as (symbol, code length) pairs; canonical codes are rebuilt
from the lengths on both sides, so the table costs a few bytes per distinct symbol.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Sequence

import numpy as np

from mcp.quantization.bits import BitReader, read_varint, write_varint


def code_lengths(symbols: Sequence[int] | np.ndarray) -> dict[int, int]:
    """Huffman code length of every distinct symbol (a lone symbol gets length 1)."""
    counts = Counter(np.asarray(symbols).ravel().tolist())
    if not counts:
        return {}
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    # heap items: (weight, tie-breaker, symbols in the subtree)
    heap = [(w, i, [s]) for i, (s, w) in enumerate(sorted(counts.items()))]
    heapq.heapify(heap)
    lengths = dict.fromkeys(counts, 0)
    tie = len(heap)
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length), canonical order: by length, then by symbol."""
    codes: dict[int, tuple[int, int]] = {}
    code, prev = 0, 0
    for sym, length in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= length - prev
        codes[sym] = (code, length)
        code += 1
        prev = length
    return codes


def encode(symbols: Sequence[int] | np.ndarray) -> bytes:
    """Table + count + bitstream. Symbols are non-negative integers."""
    values = np.asarray(symbols, dtype=np.int64).ravel()
    if values.size and values.min() < 0:
        raise ValueError("Huffman symbols must be non-negative")
    lengths = code_lengths(values)
    codes = canonical_codes(lengths)
    out = bytearray()
    write_varint(out, len(lengths))
    prev = 0
    for sym, length in sorted(lengths.items()):  # symbols as deltas: small varints
        write_varint(out, sym - prev)
        out.append(length)
        prev = sym
    write_varint(out, values.size)
    if values.size:
        syms = np.array(sorted(codes))
        table_code = np.array([codes[s][0] for s in syms], dtype=np.uint64)
        table_len = np.array([codes[s][1] for s in syms], dtype=np.int64)
        pos = np.searchsorted(syms, values)
        code, length = table_code[pos], table_len[pos]
        # expand each code into its bits, most significant first
        max_len = int(length.max())
        shifts = np.arange(max_len - 1, -1, -1, dtype=np.uint64)
        bits = ((code[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
        keep = np.arange(max_len)[None, :] >= (max_len - length)[:, None]
        out += np.packbits(bits[keep]).tobytes()
    return bytes(out)


def decode(data: bytes, offset: int = 0) -> tuple[np.ndarray, int]:
    """Inverse of :func:`encode`: (symbols, offset after the stream)."""
    n_sym, offset = read_varint(data, offset)
    lengths: dict[int, int] = {}
    prev = 0
    for _ in range(n_sym):
        delta, offset = read_varint(data, offset)
        prev += delta
        lengths[prev] = data[offset]
        offset += 1
    count, offset = read_varint(data, offset)
    if count == 0:
        return np.zeros(0, dtype=np.int64), offset
    lookup = {(length, code): sym for sym, (code, length) in canonical_codes(lengths).items()}
    reader = BitReader(data, offset)
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        code, length = 0, 0
        while True:
            code = (code << 1) | reader.bit()
            length += 1
            sym = lookup.get((length, code))
            if sym is not None:
                out[i] = sym
                break
            if length > 64:
                raise ValueError("corrupt Huffman stream")
    return out, reader.end()
