"""Reading a file as text, with one clear error for an empty file, binary data or a wrong encoding."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import TextIO

from keel.doctor.log import LogReadError

HEAD_BYTES = 65536  # looked at for NUL bytes: a binary file shows one early
CUT_CHARACTER = "keel-cut-character"  # the decoding error handler that leaves out a character cut off at the end


def _leave_out_a_cut_character(exc: UnicodeError) -> tuple[str, int]:
    """A codecs error handler: the bytes of a character cut off at the end of the data (a run killed while writing
    it: tqdm's bar '█', an ellipsis) are left out; any other undecodable byte raises as ``strict`` does.

    Decoding a stream, UTF-8's incremental decoder holds an unfinished character until the next block, so "unexpected
    end of data" is raised only at the end of the file.
    """
    if isinstance(exc, UnicodeDecodeError) and exc.reason == "unexpected end of data" and exc.end - exc.start < 4:
        return "", exc.end
    raise exc


codecs.register_error(CUT_CHARACTER, _leave_out_a_cut_character)


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


def open_text(path: Path, newline: str | None = None) -> TextIO:
    """``path`` opened for streaming as text (UTF-8, a BOM ignored, a character cut off at the end left out; newlines
    as `open` takes them): readers catch `UnicodeDecodeError` and raise `undecodable`."""
    return path.open(encoding="utf-8-sig", errors=CUT_CHARACTER, newline=newline)


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM ignored; a character cut off at the end, as a killed run leaves it, left out);
    `LogReadError` when it is empty or not text."""
    check_text_head(path)  # before reading it whole: a binary file given by mistake may be gigabytes
    try:
        return path.read_bytes().decode("utf-8-sig", errors=CUT_CHARACTER)
    except UnicodeDecodeError as exc:
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None
