"""Reading a file as text, with one clear error for binary data or a wrong encoding."""

from __future__ import annotations

from pathlib import Path

from keel.doctor.log import LogReadError


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM ignored); `LogReadError` when it is empty or not text."""
    data = path.read_bytes()
    if not data.strip():
        raise LogReadError(f"{path}: the file is empty")
    nul = data.find(b"\x00", 0, 65536)
    if nul >= 0:
        raise LogReadError(f"{path}: binary data (a NUL byte at offset {nul}), not a text log")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None
