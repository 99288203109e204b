"""Big console logs: a reader streams the file (memory grows with the steps kept, not with the file), and format
detection looks at the file's head, not the whole of it.

Outside-in: a Megatron-LM console of a long pre-training run is gigabytes, most of it lines that are no metric
(arguments, memory reports, DeepSpeed's logging); the generated logs here have that shape, small.
"""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.doctor import detect_format, read_log
from keel.doctor._text import read_lines, read_text
from keel.doctor.log import LogReadError

NOISE = "[2024-05-01 12:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 0] memory report: 12.5 GB allocated\n"
STEP = " iteration {s:8d}/   100000 | lm loss: {loss:.6E} | grad norm: 1.234 | loss scale: 4096.0 |\n"
NOISE_MB = 6


def _megatron_log(path, steps=20, noise_mb=NOISE_MB):
    """A Megatron console: a few iteration lines, each followed by megabytes of lines that are no metric."""
    noise = NOISE * (noise_mb * 1_000_000 // len(NOISE) // steps)
    with path.open("w") as fh:
        for s in range(1, steps + 1):
            fh.write(STEP.format(s=s, loss=3.0 - 0.01 * s))
            fh.write(noise)


def _peak_mb(work) -> float:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and a head far smaller than the test's logs (the defaults are 1 MiB and 4 MiB)."""
    import keel.doctor._text as text

    monkeypatch.setattr(text, "BLOCK_BYTES", 1 << 16, raising=False)
    monkeypatch.setattr(text, "HEAD_TEXT_BYTES", 1 << 18, raising=False)


def test_a_console_log_is_read_line_by_line_not_whole(tmp_path, small_blocks):
    # was: the file's bytes, its text and a list of its lines all at once (668 MB peak RSS for `keel doctor` on a
    # 100 MB Megatron log of 330k steps)
    path = tmp_path / "stdout.log"
    _megatron_log(path)
    assert _peak_mb(lambda: sum(1 for _ in read_lines(path).lines)) < 1


def test_a_console_reader_keeps_its_steps_numbers_not_their_fields(tmp_path, small_blocks):
    # was: every step's fields as a dict of strings until the end of the file (547 MB to read a 100 MB Megatron log
    # of 330k steps; 139 MB for all of `keel doctor` now)
    path = tmp_path / "stdout.log"
    path.write_text("".join(STEP.format(s=s, loss=3.0 - 1e-5 * s) for s in range(1, 4_001)))
    holder: list = []
    assert _peak_mb(lambda: holder.append(read_log(path))) < 1.5
    assert len(holder[0].records) == 4_000 and holder[0].format == "megatron"


def test_format_detection_reads_the_head_of_a_big_log(tmp_path, small_blocks):
    # was: read_console of the whole file, then a dozen regex scans over all of it, before the reader read it again
    path = tmp_path / "stdout.log"
    _megatron_log(path)
    assert _peak_mb(lambda: detect_format(path)) < 2
    log = read_log(path)
    assert log.format == "megatron" and len(log.records) == 20


def test_a_format_whose_lines_start_beyond_the_head_is_still_found(tmp_path, monkeypatch):
    import keel.doctor._text as text

    monkeypatch.setattr(text, "HEAD_TEXT_BYTES", 4096)
    path = tmp_path / "stdout.log"
    path.write_text(NOISE * 200 + STEP.format(s=1, loss=2.0) + STEP.format(s=2, loss=1.9))
    assert detect_format(path) == "megatron"


def _write(path, data: bytes) -> None:
    path.write_bytes(data)


# text with every line break str.splitlines knows, CRLF split across blocks, multi-byte characters cut by a block
_TEXT = st.lists(st.sampled_from([*"ab é█\r\n\x0b\x0c\x1c\x85\u2028", "\r\n"]), max_size=120).map("".join)


@settings(max_examples=100, deadline=None)
@given(text=_TEXT, block=st.integers(1, 9), newlines_only=st.booleans())
def test_streamed_lines_are_the_lines_of_the_whole_text(tmp_path_factory, text, block, newlines_only):
    path = tmp_path_factory.mktemp("lines") / "log.txt"
    _write(path, text.encode())
    if not text.encode().strip():  # whitespace alone, as bytes.strip sees it: an empty log
        with pytest.raises(LogReadError, match="empty"):
            list(read_lines(path, block_bytes=block).lines)
        return
    lines = read_lines(path, at_newlines_only=newlines_only, block_bytes=block)
    got = list(lines.lines)
    assert got == (text.split("\n") if newlines_only else text.splitlines())
    assert lines.unterminated == (text[-1] not in ("\r\n" if newlines_only else "\r\n\x0b\x0c\x1c\x85\u2028"))


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300), block=st.integers(1, 9))
def test_streamed_lines_of_any_bytes_are_the_whole_texts_or_one_clear_error(tmp_path_factory, data, block):
    path = tmp_path_factory.mktemp("bytes") / "log.txt"
    _write(path, data)
    try:
        whole = read_text(path).splitlines()
    except LogReadError:
        with pytest.raises(LogReadError):
            list(read_lines(path, block_bytes=block).lines)
        return
    got = list(read_lines(path, block_bytes=block).lines)
    if "\x1b" not in "".join(whole):  # escapes are left out line by line: one that spans a line break stays
        assert got == whole


def test_terminal_colours_and_a_cut_last_character_are_left_out_when_streamed(tmp_path):
    path = tmp_path / "log.txt"
    _write(path, "\x1b[32mstep 1 loss 2.0\x1b[0m\r\nstep 2 █".encode()[:-1])
    lines = read_lines(path, block_bytes=3)
    assert list(lines.lines) == ["step 1 loss 2.0", "step 2 "]
    assert lines.unterminated and lines.cut_off(2) and not lines.cut_off(1)


def test_an_undecodable_byte_is_one_error_that_names_where(tmp_path):
    path = tmp_path / "log.txt"
    _write(path, b"step 1 loss 2.0\n" * 10 + b"\xff\xfe step 2\n")
    with pytest.raises(LogReadError, match="not UTF-8 text .*offset 160"):
        list(read_lines(path, block_bytes=7).lines)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("stdout.log", "".join(STEP.format(s=s, loss=2.0) for s in range(1, 3000))),
        ("log.csv", "step,loss\n" + "".join(f"{s},2.0\n" for s in range(20_000))),
        ("log.jsonl", "".join(f'{{"step": {s}, "loss": 2.0}}\n' for s in range(10_000))),
    ],
)
def test_the_streaming_readers_report_how_far_they_have_read(tmp_path, small_blocks, name, text):
    from keel.doctor._text import reading_reported

    path = tmp_path / name
    path.write_text(text)
    offsets: list[int] = []
    with reading_reported(offsets.append):
        read_log(path)
    assert len(offsets) > 2 and offsets[-1] == path.stat().st_size  # a block at a time, up to the end
    assert read_log(path) is not None  # nothing listens outside the block


@pytest.mark.parametrize(("rows", "columns"), [(24, 120), (0, 0)])
def test_keel_doctor_draws_a_bar_over_one_big_logs_bytes_on_a_terminal(tmp_path, monkeypatch, rows, columns):
    # was: one big log showed nothing until its result (the bar was only over a folder's runs); and on a terminal
    # that reports 0 rows (a pty nobody sized: `script`, some CI runners) tqdm drew nothing
    import fcntl
    import os
    import select
    import struct
    import sys
    import termios

    from keel.doctor import cli

    path = tmp_path / "stdout.log"
    _megatron_log(path, noise_mb=1)
    monkeypatch.setattr(cli, "BIG_LOG_BYTES", 100_000)
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    terminal = os.fdopen(follower, "w")
    try:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert cli._examine(path, None, [], progress=True) is None
        terminal.flush()
        chunks = []  # all of it: a loaded machine draws more redraws than one read returns
        while select.select([leader], [], [], 0.2 if chunks else 5.0)[0]:
            chunks.append(os.read(leader, 1 << 16))
        drawn = b"".join(chunks).decode(errors="replace")
    finally:
        terminal.close()
        os.close(leader)
    assert "keel doctor stdout.log" in drawn and "1.00M" in drawn  # the file's bytes, not its steps
    assert "keel doctor stdout.log: detectors" in drawn  # then the detectors' pass (was: the bytes bar at 100 %)
