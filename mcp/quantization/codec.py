"""The compressed payload: every tensor a model needs at inference, encoded for real.

``size_bytes_compressed`` is ``len(encode(...))``: packed b-bit values, codebooks,
scales and zero points, sparse indices and Huffman tables are all bytes in the stream,
never a formula. :func:`decode` restores the tensors bit for bit.

Layout: magic ``MCPZ``, a version byte, the tensor count, then per tensor (in the
order of the model's sorted ``state_dict`` keys; names come from the architecture,
shapes are stored and checked) a kind byte, the shape, the dequantisation data and
the symbol stream(s):

- ``RAW``: float32 values (biases, BatchNorm statistics, unquantized weights), dense
  or, when smaller, as the gaps between non-zero elements and their values (a pruned
  float layer);
- ``CODEBOOK``: k float32 centroids; symbol i is centroid i, symbol k is 0;
- ``UNIFORM``: bits, signed/unsigned grid, axis, float32 scales and zero points;
  symbol = integer - qmin.

A quantized tensor's symbols are stored ``dense`` (every element) or ``sparse`` (the
gaps between non-zero elements, capped at 2^c - 1 with filler zeros bridging longer
gaps as in Deep Compression, then their symbols), each stream with ``fixed`` width or
``huffman`` coded; the encoder tries the layouts that ``coding`` allows (and every
cap c) and keeps the smallest, which the payload records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from mcp.quantization import huffman
from mcp.quantization.bits import bits_for, pack, read_varint, unpack, varint_size, write_varint

MAGIC, VERSION = b"MCPZ", 1
RAW, CODEBOOK, UNIFORM = 0, 1, 2
DENSE_FIXED, DENSE_HUFFMAN, SPARSE_FIXED, SPARSE_HUFFMAN = 0, 1, 2, 3
CODINGS = ("fixed", "huffman")


@dataclass
class Codebook:
    """Weight sharing: value = centroids[label] where mask, else 0."""

    centroids: np.ndarray  # (k,) float32
    labels: np.ndarray  # int, tensor shape
    mask: np.ndarray  # bool, tensor shape

    def symbols(self) -> tuple[np.ndarray, int]:
        """(symbols, zero symbol)."""
        k = self.centroids.size
        return np.where(self.mask, self.labels, k).ravel(), k

    def values(self) -> np.ndarray:
        return np.where(self.mask, self.centroids[np.where(self.mask, self.labels, 0)], 0).astype(np.float32)


@dataclass
class Uniform:
    """Fixed point: value = (q - zero[c]) * scale[c] along ``axis`` (-1: per tensor)."""

    q: np.ndarray  # int, tensor shape
    scale: np.ndarray  # float32 (C,) or (1,)
    zero: np.ndarray  # int (C,) or (1,)
    bits: int
    symmetric: bool
    axis: int

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    def symbols(self) -> tuple[np.ndarray, int | None]:
        """(symbols, zero symbol when one zero point serves all channels)."""
        zeros = np.unique(self.zero)
        return (self.q - self.qmin).ravel(), int(zeros[0] - self.qmin) if zeros.size == 1 else None

    def values(self) -> np.ndarray:
        shape = [1] * self.q.ndim
        if self.axis >= 0:
            shape[self.axis] = -1
        scale = self.scale.astype(np.float32).reshape(shape)
        zero = self.zero.astype(np.int64).reshape(shape)
        # the same float32 arithmetic torch's fake quantization does: (q - z) * s
        return ((self.q - zero).astype(np.float32) * scale).astype(np.float32)


Entry = np.ndarray | Codebook | Uniform


def _zigzag(v: int) -> int:
    return (v << 1) ^ (v >> 63) if v < 0 else v << 1


def _unzigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _stream(out: bytearray, values: np.ndarray, huff: bool) -> None:
    if huff:
        out += huffman.encode(values)
        return
    width = bits_for(int(values.max()) if values.size else 0)
    out.append(width)
    write_varint(out, values.size)
    out += pack(values, width)


def _stream_size(values: np.ndarray, huff: bool, below: int | None = None) -> int:
    """Bytes :func:`_stream` writes, counted without writing them (with ``below``, a Huffman
    stream that cannot be smaller may be counted as a lower bound of at least ``below``)."""
    if huff:
        return huffman.encoded_size(values, below)
    width = bits_for(int(values.max()) if values.size else 0)
    return 1 + varint_size(values.size) + (values.size * width + 7) // 8


def _read_stream(data: bytes, offset: int) -> tuple[np.ndarray, int]:
    width = data[offset]
    count, offset = read_varint(data, offset + 1)
    return unpack(data, offset, count, width)


def _with_fillers(positions: np.ndarray, values: np.ndarray, cap_bits: int, filler) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative indices: the gap (zeros skipped) before each kept
    element, at most ``2^cap_bits - 1``; a longer gap is bridged by filler entries that
    store ``filler`` (a zero) at the position they land on."""
    gaps = np.diff(positions, prepend=-1) - 1
    cap = 2 ** cap_bits - 1
    fillers = gaps // (cap + 1)
    if not fillers.any():
        return gaps, values
    counts = fillers + 1
    owner = np.repeat(np.arange(gaps.size), counts)
    starts = np.cumsum(counts) - counts
    last = (np.arange(owner.size) - starts[owner]) == fillers[owner]
    out_gaps = np.where(last, gaps[owner] % (cap + 1), cap)
    out_values = np.where(last, values[owner], filler).astype(values.dtype)
    return out_gaps, out_values


def _sparse_candidates(positions: np.ndarray, values: np.ndarray, filler):
    """(gaps, values) for every gap cap from 1 bit up to the one that needs no filler."""
    widest = bits_for(int((np.diff(positions, prepend=-1) - 1).max(initial=0)))
    return [_with_fillers(positions, values, c, filler) for c in range(1, widest + 1)]


def _symbols_payload(symbols: np.ndarray, zero_symbol: int | None, coding: str) -> bytes:
    """The smallest of the allowed stream layouts, prefixed with its mode byte. Every
    layout's size is counted first (a Huffman layout that cannot beat the smallest so far
    only as far as its entropy bound); only the smallest (the first of equals) is written."""
    huff_ok = coding == "huffman"
    layouts = [(False, None, None)] + ([(True, None, None)] if huff_ok else [])
    if zero_symbol is not None:
        positions = np.flatnonzero(symbols != zero_symbol)
        layouts += [(huff, gaps, kept) for gaps, kept in _sparse_candidates(positions, symbols[positions], zero_symbol)
                    for huff in ((False, True) if huff_ok else (False,))]
    best, best_size = None, None
    for layout in layouts:
        huff, gaps, kept = layout
        if gaps is None:
            size = 1 + _stream_size(symbols, huff, best_size and best_size - 1)
        else:
            size = 1 + varint_size(zero_symbol)
            size += _stream_size(gaps, huff, best_size and best_size - size)
            size += _stream_size(kept, huff, best_size and max(best_size - size, 0))
        if best_size is None or size < best_size:
            best, best_size = layout, size
    huff, gaps, kept = best
    if gaps is None:
        out = bytearray([DENSE_HUFFMAN if huff else DENSE_FIXED])
        _stream(out, symbols, huff)
        return bytes(out)
    out = bytearray([SPARSE_HUFFMAN if huff else SPARSE_FIXED])
    write_varint(out, zero_symbol)
    _stream(out, gaps, huff)
    _stream(out, kept, huff)
    return bytes(out)


def _read_symbols(data: bytes, offset: int, count: int) -> tuple[np.ndarray, int]:
    mode = data[offset]
    offset += 1
    read = huffman.decode if mode in (DENSE_HUFFMAN, SPARSE_HUFFMAN) else _read_stream
    if mode in (DENSE_FIXED, DENSE_HUFFMAN):
        return read(data, offset)
    zero_symbol, offset = read_varint(data, offset)
    gaps, offset = read(data, offset)
    kept, offset = read(data, offset)
    symbols = np.full(count, zero_symbol, dtype=np.int64)
    symbols[np.cumsum(gaps + 1) - 1] = kept
    return symbols, offset


def _raw_payload(values: np.ndarray, coding: str) -> bytes:
    """Mode byte, then dense float32, or the gaps (fixed width or Huffman) and the
    non-zero float32 values, whichever is smallest (counted first, the smallest written)."""
    flat = values.ravel()
    positions = np.flatnonzero(flat)
    best, best_size = None, 1 + 4 * flat.size
    if positions.size < flat.size:
        for gaps, kept in _sparse_candidates(positions, flat[positions], np.float32(0)):
            for huff in (False, True) if coding == "huffman" else (False,):
                size = 1 + _stream_size(gaps, huff) + varint_size(kept.size) + 4 * kept.size
                if size < best_size:
                    best, best_size = (huff, gaps, kept), size
    if best is None:
        return bytes([DENSE_FIXED]) + np.ascontiguousarray(values, dtype="<f4").tobytes()
    huff, gaps, kept = best
    out = bytearray([SPARSE_HUFFMAN if huff else SPARSE_FIXED])
    _stream(out, gaps, huff)
    write_varint(out, kept.size)
    out += np.ascontiguousarray(kept, dtype="<f4").tobytes()
    return bytes(out)


def _header(out: bytearray, kind: int, shape: Sequence[int]) -> None:
    """A tensor's kind byte and its shape."""
    out.append(kind)
    out.append(len(shape))
    for d in shape:
        write_varint(out, int(d))


def _container(count: int) -> bytearray:
    out = bytearray(MAGIC)
    out.append(VERSION)
    write_varint(out, count)
    return out


def encode(entries: Sequence[Entry], coding: str | Sequence[str] = "huffman") -> bytes:
    """Encode tensors (raw float arrays, :class:`Codebook` or :class:`Uniform`); ``coding``
    for all of them, or one per entry."""
    codings = [coding] * len(entries) if isinstance(coding, str) else list(coding)
    bad = [c for c in codings if c not in CODINGS]
    if bad or len(codings) != len(entries):
        raise ValueError(f"unknown coding {bad[0] if bad else coding!r}; choose one of {', '.join(CODINGS)}, one "
                         f"for all entries or one per entry")
    out = _container(len(entries))
    for entry, coding in zip(entries, codings):
        if isinstance(entry, Codebook):
            shape = entry.labels.shape
        elif isinstance(entry, Uniform):
            shape = entry.q.shape
        else:
            shape = np.shape(entry)
        kind = CODEBOOK if isinstance(entry, Codebook) else UNIFORM if isinstance(entry, Uniform) else RAW
        _header(out, kind, shape)
        if kind == RAW:
            out += _raw_payload(np.asarray(entry, dtype=np.float32), coding)
            continue
        if kind == CODEBOOK:
            write_varint(out, entry.centroids.size)
            out += np.ascontiguousarray(entry.centroids, dtype="<f4").tobytes()
        else:
            out.append(entry.bits)
            out.append(int(entry.symmetric))
            out.append(entry.axis + 1)
            write_varint(out, entry.scale.size)
            out += np.ascontiguousarray(entry.scale, dtype="<f4").tobytes()
            for z in entry.zero.ravel().tolist():
                write_varint(out, _zigzag(int(z)))
        symbols, zero_symbol = entry.symbols()
        out += _symbols_payload(np.asarray(symbols, dtype=np.int64), zero_symbol, coding)
    return bytes(out)


def decode(data: bytes) -> list[np.ndarray]:
    """Float32 arrays of every tensor, in order: the inverse of :func:`encode`."""
    if data[:4] != MAGIC:
        raise ValueError("not an mcp compressed payload (bad magic)")
    if data[4] != VERSION:
        raise ValueError(f"unsupported payload version {data[4]}")
    n, offset = read_varint(data, 5)
    tensors = []
    for _ in range(n):
        kind, ndim = data[offset], data[offset + 1]
        offset += 2
        shape = []
        for _ in range(ndim):
            d, offset = read_varint(data, offset)
            shape.append(d)
        count = int(np.prod(shape)) if shape else 1
        if kind == RAW:
            mode = data[offset]
            offset += 1
            if mode == DENSE_FIXED:
                tensors.append(np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).copy())
                offset += 4 * count
                continue
            gaps, offset = (huffman.decode if mode == SPARSE_HUFFMAN else _read_stream)(data, offset)
            n_kept, offset = read_varint(data, offset)
            values = np.zeros(count, dtype=np.float32)
            values[np.cumsum(gaps + 1) - 1] = np.frombuffer(data, dtype="<f4", count=n_kept, offset=offset)
            offset += 4 * n_kept
            tensors.append(values.reshape(shape))
            continue
        if kind == CODEBOOK:
            k, offset = read_varint(data, offset)
            centroids = np.frombuffer(data, dtype="<f4", count=k, offset=offset).copy()
            offset += 4 * k
            symbols, offset = _read_symbols(data, offset, count)
            symbols = symbols.reshape(shape)
            mask = symbols != k
            tensors.append(Codebook(centroids, np.where(mask, symbols, 0), mask).values())
        elif kind == UNIFORM:
            bits, symmetric, axis = data[offset], bool(data[offset + 1]), data[offset + 2] - 1
            c, offset = read_varint(data, offset + 3)
            scale = np.frombuffer(data, dtype="<f4", count=c, offset=offset).copy()
            offset += 4 * c
            zero = []
            for _ in range(c):
                z, offset = read_varint(data, offset)
                zero.append(_unzigzag(z))
            symbols, offset = _read_symbols(data, offset, count)
            u = Uniform(np.zeros(0), scale, np.array(zero), bits, symmetric, axis)
            u.q = symbols.reshape(shape) + u.qmin
            tensors.append(u.values())
        else:
            raise ValueError(f"corrupt payload: unknown tensor kind {kind}")
    return tensors


def inference_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point tensors inference needs (``num_batches_tracked`` is not one),
    sorted by key: the order does not depend on how parameters were registered."""
    return {k: v for k, v in sorted(model.state_dict().items()) if v.is_floating_point()}


def dense_size(model: torch.nn.Module) -> int:
    """Bytes of the payload that stores every tensor of the model's inference state
    (:func:`inference_state`: weights, biases, BatchNorm running statistics) as dense
    float32: what :func:`encode_model` writes when nothing is quantized and no tensor is
    sparse enough to be stored as gaps. Counted, not encoded. ``size_bytes_fp32`` is this
    number, so it counts the same tensors, in the same container, as ``size_bytes_compressed``,
    which can only be smaller or equal (the encoder keeps a layout only when it is smaller
    than the dense one)."""
    state = inference_state(model)
    size = len(_container(len(state)))
    for tensor in state.values():
        header = bytearray()
        _header(header, RAW, tuple(tensor.shape))
        size += len(header) + 1 + 4 * tensor.numel()  # the mode byte, then float32 values
    return size


def encode_model(model: torch.nn.Module, quantized: Mapping[str, Codebook | Uniform],
                 coding: str | Mapping[str, str]) -> bytes:
    """Encode a model's inference state; ``quantized`` maps state_dict keys to their
    quantized form, every other tensor is stored raw. ``coding``: for every tensor, or per
    state_dict key (``fixed`` for a key it does not name)."""
    entries: list[Entry] = []
    codings: list[str] = []
    for key, tensor in inference_state(model).items():
        entries.append(quantized[key] if key in quantized else tensor.detach().cpu().float().numpy())
        codings.append(coding if isinstance(coding, str) else coding.get(key, "fixed"))
    return encode(entries, codings)


def decode_into(model: torch.nn.Module, data: bytes) -> None:
    """Load a payload into a model of the same architecture (strict on shapes)."""
    state = inference_state(model)
    tensors = decode(data)
    if len(tensors) != len(state):
        raise ValueError(f"payload holds {len(tensors)} tensors; the model needs {len(state)}")
    new = {}
    for (key, ref), arr in zip(state.items(), tensors):
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"payload tensor for {key} has shape {arr.shape}; the model needs {tuple(ref.shape)}")
        new[key] = torch.from_numpy(arr).to(ref.device, ref.dtype)
    model.load_state_dict(new, strict=False)

