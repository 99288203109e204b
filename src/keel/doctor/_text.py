"""Reading a file as text, with one clear error for an empty file, binary data or a wrong encoding."""

from __future__ import annotations

import codecs
import contextlib
import io
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

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
    as `open` takes them; how far it is read told to `reading_reported`'s callback): readers catch
    `UnicodeDecodeError` and raise `undecodable`."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors=CUT_CHARACTER, newline=newline)


# where a streaming reader tells how far into its file it has read (`reading_reported`); None: nobody listens
_REPORT_POSITION: ContextVar[Callable[[int], None] | None] = ContextVar("keel_doctor_report_position", default=None)


@contextlib.contextmanager
def reading_reported(reached: Callable[[int], None]) -> Iterator[None]:
    """Within it, the streaming readers (console logs, CSV, JSON lines) call ``reached(offset)`` with the byte
    offset they have read up to, a block at a time: `keel doctor`'s progress bar over one big log.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.txt"
        >>> _ = p.write_text("iter 1: loss 2.0\\n")
        >>> offsets = []
        >>> with reading_reported(offsets.append):
        ...     lines = list(read_lines(p).lines)
        >>> offsets[-1] == p.stat().st_size
        True
    """
    token = _REPORT_POSITION.set(reached)
    try:
        yield
    finally:
        _REPORT_POSITION.reset(token)


class _ReportedFile(io.FileIO):
    """A file that tells `reading_reported`'s callback its position after each read."""

    def __init__(self, path: Path, reached: Callable[[int], None]) -> None:
        super().__init__(path, "rb")
        self._reached = reached

    def readinto(self, buffer: Any) -> int | None:
        count = super().readinto(buffer)
        self._reached(self.tell())
        return count


def _open_binary(path: Path) -> io.BufferedReader:
    reached = _REPORT_POSITION.get()
    return io.BufferedReader(_ReportedFile(path, reached) if reached is not None else io.FileIO(path, "rb"))


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


BLOCK_BYTES = 1 << 20  # a streamed log is decoded this much at a time
HEAD_TEXT_BYTES = 4 << 20  # format detection looks at this much of a log first (a Megatron banner is ~50 KB)
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines splits


def read_head(path: Path) -> tuple[str, bool]:
    """`read_console` of the file's first `HEAD_TEXT_BYTES`, cut after its last whole line, and whether that is the
    whole file: format detection needs the head of a gigabyte console log, not all of it."""
    check_text_head(path)
    with path.open("rb") as fh:
        head = fh.read(HEAD_TEXT_BYTES)
        whole = not fh.read(1)
    if not whole:
        head = head[: head.rfind(b"\n") + 1] or head  # one line longer than the head: its start
    try:
        return strip_ansi(head.decode("utf-8-sig", errors=CUT_CHARACTER)), whole
    except UnicodeDecodeError as exc:
        raise LogReadError(f"{path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None


class TextLines:
    """A text log's lines, streamed from the file a block at a time (memory grows with the longest line, not with
    the file), and whether its last one is unterminated (no newline after it).

    ``lines`` iterates once over the lines `read_console` would give, split as ``str.splitlines`` splits (or at
    ``\\n`` alone: the Trainer's console keeps tqdm's ``\\r`` redraws inside a line; or at ``\\r`` and ``\\n``, each
    one a break, as ``re.split(r"[\\r\\n]")``: a tqdm bar's redraws, one line of a console that never printed a
    newline), each line's terminal escapes left out. An empty or binary file, or an undecodable byte, is a
    `LogReadError` while iterating.

    A line reader that meets a line it cannot parse asks `cut_off` first: the file's last line, unterminated, is
    one a run was still writing when the log was read (or was killed in the middle of) — left out with a note
    (`note`), not an error for the whole log. Any other malformed line stays the reader's error.
    """

    def __init__(
        self, path: Path, *, at_newlines_only: bool = False, at_returns: bool = False, block_bytes: int | None = None
    ) -> None:
        self.path = path
        self.unterminated = False
        self.left_out = False
        self._last_number: int | None = None  # the last line's number, once it has been read
        self._at_newlines_only = at_newlines_only
        self._at_returns = at_returns
        self._block_bytes = block_bytes or BLOCK_BYTES
        self.lines: Iterator[str] = self._lines()

    def cut_off(self, number: int) -> bool:
        """Whether line ``number`` (from 1) is the cut last line; it is then counted as left out."""
        if self.unterminated and number == self._last_number:
            self.left_out = True
        return self.left_out and number == self._last_number

    def note(self, notes: list[str]) -> None:
        """Add `CUT_LINE_NOTE` to ``notes`` when the cut last line was left out."""
        if self.left_out:
            notes.append(CUT_LINE_NOTE)

    def _lines(self) -> Iterator[str]:
        number = 0
        for line, last in self._raw_lines():
            number += 1
            if last:
                self._last_number = number
            yield strip_ansi(line)

    def _raw_lines(self) -> Iterator[tuple[str, bool]]:
        """(line, whether it is the file's last) — the last one is known only at the end of the file."""
        newline_only = self._at_newlines_only or self._at_returns  # every piece is a line, the last one too
        breaks = "\n" if newline_only else _LINE_BREAKS
        partial: list[str] = []  # the pieces of a line that runs on past a block
        last_char = ""
        for text in self._blocks():
            last_char = text[-1]
            if self._at_returns:
                pieces = _RETURNS.split(text)
            else:
                pieces = text.split("\n") if newline_only else text.splitlines(keepends=True)
            tail = pieces.pop()
            if not newline_only and tail[-1] in breaks:  # the block ended with a line break: the line is whole
                pieces.append(tail)
                tail = ""
            for piece in pieces:
                line = piece if newline_only else piece[:-2] if piece.endswith("\r\n") else piece[:-1]
                if partial:
                    line = "".join(partial) + line
                    partial.clear()
                yield line, False
            if tail:
                partial.append(tail)
        if newline_only:
            self.unterminated = last_char not in "\r\n"
            yield "".join(partial), True
        elif partial:
            self.unterminated = True
            yield "".join(partial), True

    def _blocks(self) -> Iterator[str]:
        """The file decoded a block at a time; a ``\\r`` that ends a block waits for the next (it may be a CRLF's)."""
        check_text_head(self.path)
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=CUT_CHARACTER)
        offset = 0
        held = ""
        with _open_binary(self.path) as fh:
            while True:
                block = fh.read(self._block_bytes)
                try:
                    text = held + decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    at = offset + exc.start - len(decoder.getstate()[0]) + len(block) - len(exc.object)
                    raise LogReadError(f"{self.path}: not UTF-8 text (undecodable byte at offset {at})") from None
                offset += len(block)
                held = ""
                if block and text.endswith("\r"):
                    text, held = text[:-1], "\r"
                if text:
                    yield text
                if not block:
                    return


_RETURNS = re.compile(r"[\r\n]")


def read_lines(
    path: Path, *, at_newlines_only: bool = False, at_returns: bool = False, block_bytes: int | None = None
) -> TextLines:
    """A `TextLines` that streams ``path``'s lines (``str.splitlines``, split at ``\\n`` alone, or at each ``\\r`` and
    ``\\n``)."""
    return TextLines(path, at_newlines_only=at_newlines_only, at_returns=at_returns, block_bytes=block_bytes)
