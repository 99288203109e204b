"""Reading a file as text, with one clear error for an empty file, binary data or a wrong encoding."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
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


# A terminal escape: CSI (colours "\x1b[32m", cursor moves "\x1b[A", "\x1b[2K"), OSC (a window title, up to BEL or
# ST) or a two-character one. Bounded: linear on any text.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]{0,32}[ -/]{0,4}[@-~]|\][^\x07\x1b]{0,4096}(?:\x07|\x1b\\)?|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escapes (a colouring log handler's, tqdm's cursor moves): never a log's data."""
    return ANSI_ESCAPE.sub("", text) if "\x1b" in text else text


def read_console(path: Path) -> str:
    """`read_text` of a console log, terminal escapes left out (`strip_ansi`)."""
    return strip_ansi(read_text(path))


def read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM ignored; a character cut off at the end, as a killed run leaves it, left out);
    `LogReadError` when it is empty or not text."""
    check_text_head(path)  # before reading it whole: a binary file given by mistake may be gigabytes
    try:
        return path.read_bytes().decode("utf-8-sig", errors=CUT_CHARACTER)
    except UnicodeDecodeError as exc:
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None


CUT_LINE_NOTE = (
    "the last line is cut off (no newline after it: the run was still writing it, or was killed) and left out"
)


@dataclass
class TextLines:
    """A text log's lines, and whether its last one is unterminated (no newline after it).

    A line reader that meets a line it cannot parse asks `cut_off` first: the file's last line, unterminated, is
    one a run was still writing when the log was read (or was killed in the middle of) — left out with a note
    (`note`), not an error for the whole log. Any other malformed line stays the reader's error.
    """

    lines: list[str]
    unterminated: bool
    left_out: bool = False

    def cut_off(self, number: int) -> bool:
        """Whether line ``number`` (from 1) is the cut last line; it is then counted as left out."""
        if self.unterminated and number == len(self.lines):
            self.left_out = True
        return self.left_out and number == len(self.lines)

    def note(self, notes: list[str]) -> None:
        """Add `CUT_LINE_NOTE` to ``notes`` when the cut last line was left out."""
        if self.left_out:
            notes.append(CUT_LINE_NOTE)


def read_lines(path: Path, *, at_newlines_only: bool = False) -> TextLines:
    """`read_console`'s lines (``str.splitlines``, or split at ``\\n`` alone: the Trainer's console keeps tqdm's
    ``\\r`` redraws inside a line) and whether the last one is unterminated."""
    text = read_console(path)
    lines = text.split("\n") if at_newlines_only else text.splitlines()
    return TextLines(lines=lines, unterminated=bool(text) and text[-1] not in "\r\n")
