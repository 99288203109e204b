"""TFRecord framing as TensorBoard event files use it: length, CRC of the length, payload, CRC of the payload.

Each record is ``uint64 length | uint32 masked_crc32c(length) | payload | uint32 masked_crc32c(payload)``,
little-endian. The length's CRC is checked (8 bytes, cheap even in Python): it tells an event file from
any other binary file and catches a misaligned read. The payload's CRC is not: a pure-Python CRC-32C costs
seconds on a large file and a scalar log's payloads parse or fail on their own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordError(ValueError):
    """The bytes are not TFRecord-framed (bad length checksum) at the given offset."""


def iter_records(data: bytes) -> Iterator[bytes]:
    """The payloads of the records in ``data``, in order.

    Raises:
        RecordError: A length checksum does not match (not a TFRecord file, or corrupt). A record cut off
            at the end of the data (a file still being written) ends the iteration without an error.
    """
    pos, end = 0, len(data)
    header_crcs: dict[bytes, int] = {}  # a scalar log's records have a few lengths: each header's CRC computed once
    while pos + 12 <= end:
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        expected = header_crcs.get(header)
        if expected is None:
            expected = header_crcs[header] = masked_crc32c(header)
        if expected != length_crc:
            raise RecordError(f"bad record header at byte {pos}")
        start = pos + 12
        if start + length + 4 > end:
            return  # truncated last record
        yield data[start : start + length]
        pos = start + length + 4
