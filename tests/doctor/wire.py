"""Hand-made protobuf and TFRecord bytes for the TensorBoard reader's hostile-input tests (no protobuf needed)."""

from __future__ import annotations

import struct

from keel.doctor._tfrecord import masked_crc32c

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers as int64 two's complement, as protobuf writes them
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, wire: int, value: int | bytes) -> bytes:
    """One protobuf field: an int for VARINT, raw bytes for the other wire types (LENGTH gets its length)."""
    key = varint(number << 3 | wire)
    if wire == VARINT:
        assert isinstance(value, int)
        return key + varint(value)
    assert isinstance(value, bytes)
    if wire == LENGTH:
        return key + varint(len(value)) + value
    return key + value


def scalar_event(step: int, tag: str, value: float, wall: float = 0.0) -> bytes:
    """An Event with one ``simple_value`` scalar."""
    summary_value = field(1, LENGTH, tag.encode()) + field(2, FIXED32, struct.pack("<f", value))
    return (
        field(1, FIXED64, struct.pack("<d", wall))
        + field(2, VARINT, step)
        + field(5, LENGTH, field(1, LENGTH, summary_value))
    )


def record(payload: bytes, *, header_crc: int | None = None, length: int | None = None) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the payload, the payload's masked CRC-32C."""
    header = struct.pack("<Q", len(payload) if length is None else length)
    crc = masked_crc32c(header) if header_crc is None else header_crc
    return header + struct.pack("<I", crc) + payload + struct.pack("<I", masked_crc32c(payload))
