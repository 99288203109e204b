"""The few pieces of the protobuf wire format needed to read TensorBoard scalars, without protobuf.

Only decoding, only what `tensorboard_log` reads: varints, fixed 32/64-bit fields and length-delimited
fields. Reference: https://protobuf.dev/programming-guides/encoding/.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``.

    Example:
        >>> read_varint(bytes([0xAC, 0x02]), 0)
        (300, 2)
    """
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(field number, wire type, varint, data) of each field: a varint's value with empty data, or the raw bytes
    of the other wire types with varint 0 (two typed slots, so that readers need no check of the value's type)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
            yield number, wire, value, b""
            continue
        if wire == FIXED64:
            size = 8
        elif wire == FIXED32:
            size = 4
        elif wire == LENGTH:
            size, pos = read_varint(buf, pos)
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos + size > end:
            raise WireError("field runs past the end of the message")
        yield number, wire, 0, buf[pos : pos + size]
        pos += size


def signed64(value: int) -> int:
    """A varint read as int64 (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def packed(buf: bytes, fmt: str) -> list[float]:
    """The values of a packed repeated fixed-width field (``"<f"`` float, ``"<d"`` double)."""
    size = struct.calcsize(fmt)
    return [v for (v,) in struct.iter_unpack(fmt, buf[: len(buf) - len(buf) % size])]


def packed_varints(buf: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = read_varint(buf, pos)
        values.append(signed64(value))
    return values
