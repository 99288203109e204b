"""Hand-made protobuf, TFRecord and W&B run-file bytes for the TensorBoard and W&B readers' hostile-input tests (no
protobuf needed)."""

from __future__ import annotations

import struct
import zlib

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


# W&B run files (keel.doctor.wandb_log): a 7-byte header, then LevelDB-log chunks in 32 KiB blocks.
WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
WANDB_BLOCK = 32768


def wandb_chunk(kind: int, data: bytes, *, crc: int | None = None) -> bytes:
    """One chunk: zlib CRC-32 of the type byte then the data, the length, the type (1 full, 2 first, 3 middle, 4
    last)."""
    checksum = zlib.crc32(data, zlib.crc32(bytes([kind]))) if crc is None else crc
    return struct.pack("<IHB", checksum, len(data), kind) + data


def wandb_file(records: list[bytes], header: bytes = WANDB_HEADER) -> bytes:
    """A run file holding ``records``, framed as wandb's writer frames them (a record spanning blocks in pieces,
    a block's last 6 bytes or fewer zero padding)."""
    out = bytearray(header)
    for data in records:
        first = True
        while True:
            left = WANDB_BLOCK - len(out) % WANDB_BLOCK
            if left < 7:
                out += bytes(left)
                continue
            piece, data = data[: left - 7], data[left - 7 :]
            kind = (1 if not data else 2) if first else (4 if not data else 3)
            out += wandb_chunk(kind, piece)
            first = False
            if not data:
                break
    return bytes(out)


def wandb_history(step: int | None, items: dict[str, str], *, nested: bool = True) -> bytes:
    """A Record holding a HistoryRecord: ``items`` as key → value_json (wandb 0.31 writes the key as ``nested_key``,
    earlier releases as ``key``), and the step (none when None)."""
    body = b"".join(
        field(1, LENGTH, field(2 if nested else 1, LENGTH, key.encode()) + field(16, LENGTH, value.encode()))
        for key, value in items.items()
    )
    if step is not None:
        body += field(2, LENGTH, field(1, VARINT, step) if step else b"")
    return field(2, LENGTH, body)
