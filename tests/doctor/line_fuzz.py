"""The claim every line-format reader's property test checks on generated lines."""

from __future__ import annotations

from pathlib import Path

from keel.doctor import read_log
from keel.doctor.log import LogReadError


def assert_a_log_or_one_error(tmp_path: Path, lines: list[str], format: str) -> None:
    """``lines`` written as a file read with ``format`` give a log with records, or one one-line `LogReadError`
    naming the file — never another exception."""
    path = tmp_path / "fuzz.log"
    path.write_text("\n".join(lines) + "\n")
    try:
        log = read_log(path, format=format)
    except LogReadError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert len(log.records) >= 1
