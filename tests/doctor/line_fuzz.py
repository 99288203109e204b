"""The claim every line-format reader's property test checks on generated lines."""

from __future__ import annotations

from pathlib import Path

from keel.doctor import read_log
from keel.doctor.log import LogReadError


def assert_a_log_or_one_error(tmp_path: Path, lines: list[str], format: str) -> None:
    """``lines`` written as a file read with ``format`` give a log with records, or one one-line `LogReadError`
    naming the file — never another exception. So do they without the newline after the last one (a log its run
    was still writing); and a log that reads with it reads without it."""
    path = tmp_path / "fuzz.log"
    read = []
    for end in ("\n", ""):
        path.write_text("\n".join(lines) + end)
        try:
            log = read_log(path, format=format)
        except LogReadError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            read.append(False)
        else:
            assert len(log.records) >= 1
            read.append(True)
    assert read[1] or not read[0], "the log read with its last newline, not without it"
