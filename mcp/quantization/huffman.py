"""Canonical Huffman coding of integer symbol streams, with a real encoder and decoder.

The code table is stored as (symbol, code length) pairs; canonical codes are rebuilt
from the lengths on both sides, so the table costs a few bytes per distinct symbol.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from mcp.quantization.bits import BitReader, read_varint, varint_size, write_varint


def _lengths(syms: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each of the distinct, sorted ``syms`` with ``counts``: the
    depth of its leaf in the tree built by merging the two lightest nodes (ties: the
    older node first)."""
    n = syms.size
    if n == 1:
        return np.ones(1, dtype=np.int64)
    heap = [(w, i) for i, w in enumerate(counts.tolist())]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # parents are created after their children
        depth[i] = depth[parent[i]] + 1
    return np.asarray(depth[:n], dtype=np.int64)


def code_lengths(symbols: Sequence[int] | np.ndarray) -> dict[int, int]:
    """Huffman code length of every distinct symbol (a lone symbol gets length 1)."""
    syms, counts = _counts(np.asarray(symbols, dtype=np.int64).ravel())
    if not syms.size:
        return {}
    return dict(zip(syms.tolist(), _lengths(syms, counts).tolist()))


def _counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct non-negative ``values``, sorted, and how often each occurs."""
    # small non-negative symbols (indices, gaps): one counting pass instead of a sort
    if values.size and int(values.min()) >= 0 and int(values.max()) < 4 * values.size + 1024:
        counts = np.bincount(values)
        syms = np.flatnonzero(counts)
        return syms, counts[syms]
    return np.unique(values, return_counts=True)


def encoded_size(symbols: Sequence[int] | np.ndarray, below: int | None = None) -> int:
    """``len(encode(symbols))``, counted without building the stream. With ``below``, a
    size that cannot be smaller than ``below`` may come back as a lower bound of it (at
    least ``below``; the table is counted exactly and the code as the entropy, which no
    prefix code beats), without building the code."""
    values = np.asarray(symbols, dtype=np.int64).ravel()
    syms, counts = _counts(values)
    size = varint_size(syms.size) + varint_size(values.size)
    if not syms.size:
        return size
    deltas = np.diff(syms, prepend=0)
    size += int(np.sum(1 + sum((deltas >> (7 * i)) > 0 for i in range(1, 10)))) + syms.size  # varints + lengths
    if below is not None and syms.size > 1:
        p = counts / values.size
        entropy_bits = float(-np.dot(counts, np.log2(p)))
        bound = size + (int(np.floor(entropy_bits * (1 - 1e-12))) + 7) // 8
        if bound >= below:
            return bound
    return size + (int(np.dot(counts, _lengths(syms, counts))) + 7) // 8


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
