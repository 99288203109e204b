"""Reading a file as text, with one clear error for an empty file, binary data or a wrong encoding."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from keel.doctor.log import LogReadError

HEAD_BYTES = 65536  # looked at for NUL bytes: a binary file shows one early


def check_text_head(path: Path) -> None:
    """`LogReadError` when the file is empty or its first 64 KiB hold a NUL byte (binary data, not a log).

    For readers that stream the file; an undecodable byte further on is theirs to report.
    """
    with path.open("rb") as fh:
        head = fh.read(HEAD_BYTES)
        if not head.strip() and not fh.read(1):
            raise LogReadError(f"{path}: the file is empty")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise LogReadError(f"{path}: binary data (a NUL byte at offset {nul}), not a text log")


def undecodable(path: Path, fh: TextIO) -> LogReadError:
    """The error for a streamed text file that hit an undecodable byte: it names how far reading got."""
    return LogReadError(f"{path}: not UTF-8 text (an undecodable byte before byte {fh.buffer.tell()})")


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM ignored; a character cut off at the end, as a killed run leaves it, left out);
    `LogReadError` when it is empty or not text."""
    check_text_head(path)  # before reading it whole: a binary file given by mistake may be gigabytes
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
            # a run killed while writing a multi-byte character (tqdm's bar '█', an ellipsis): the log up to it
            return data[: exc.start].decode("utf-8-sig")
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None
