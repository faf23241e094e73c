"""Bit-level helpers for the compressed payload: varints, fixed-width packing, a bit reader."""

from __future__ import annotations

import numpy as np


def write_varint(out: bytearray, value: int) -> None:
    """LEB128 unsigned varint."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def varint_size(value: int) -> int:
    """Bytes :func:`write_varint` writes for ``value``."""
    return max(1, (int(value).bit_length() + 6) // 7)


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(data):
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def bits_for(max_value: int) -> int:
    """Bits needed to store integers 0..max_value (at least 1)."""
    return max(1, int(max_value).bit_length())


def pack(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers, ``width`` bits each, most significant bit first, zero-padded."""
    values = np.asarray(values, dtype=np.uint64).ravel()
    if values.size == 0:
        return b""
    if int(values.max()) >> width:
        raise ValueError(f"value {int(values.max())} does not fit in {width} bits")
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel()).tobytes()


def unpack(data: bytes, offset: int, count: int, width: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`pack`: (values, offset after the packed bytes)."""
    nbytes = (count * width + 7) // 8
    chunk = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
    bits = np.unpackbits(chunk)[: count * width].reshape(count, width).astype(np.int64)
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return bits @ weights, offset + nbytes


class BitReader:
    """Reads single bits, most significant first, from ``data[offset:]``."""

    def __init__(self, data: bytes, offset: int):
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=offset))
        self.start, self.pos = offset, 0

    def bit(self) -> int:
        if self.pos >= self.bits.size:
            raise ValueError("truncated bitstream")
        b = int(self.bits[self.pos])
        self.pos += 1
        return b

    def end(self) -> int:
        """Byte offset just after the last bit read (streams are byte-aligned)."""
        return self.start + (self.pos + 7) // 8
