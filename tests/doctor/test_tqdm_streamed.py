"""A tqdm console is read as a stream of redraws: split at each ``\\r`` and ``\\n`` while the file is read, each kind
of bar's steps put into a table as they come.

Outside-in: tqdm's ``format_meter`` redraws ``{desc}: {pct}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate},
{postfix}]`` after ``\\r`` and prints no newline until the bar closes (``leave=True``); a ``2>&1 | tee`` console of a
long loop with one bar is therefore one line of millions of redraws. It was read whole (text, every segment, every
redraw as an object).
"""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.doctor import read_log
from keel.doctor._text import read_lines
from keel.doctor.log import LogReadError

STEPS = 6000
REDRAW = "\rtrain: {p:3d}%|#         | {n}/{total} [00:01<00:09, 10.0it/s, loss={loss:.4g}, lr=1e-4]"


def _one_line_bar(steps: int) -> str:
    """A bar that never closed: its redraws after ``\\r``, no newline at all."""
    return "".join(REDRAW.format(p=100 * n // steps, n=n, total=steps, loss=2.0 + (n % 7) / 100) for n in range(steps))


@pytest.fixture
def small_blocks(monkeypatch):
    import keel.doctor._text as text

    monkeypatch.setattr(text, "BLOCK_BYTES", 1 << 16, raising=False)
    monkeypatch.setattr(text, "HEAD_TEXT_BYTES", 1 << 18, raising=False)


def test_a_bar_that_never_printed_a_newline_is_read_without_holding_the_file(tmp_path, small_blocks):
    # was: 5.3 MB traced for this 0.5 MB file (the text, every segment, every redraw as an object); now 0.8 MB
    path = tmp_path / "train.log"
    path.write_text(_one_line_bar(STEPS))
    tracemalloc.start()
    try:
        log = read_log(path)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert log.format == "tqdm" and len(log.records) == STEPS - 1  # count 0 has no step
    last = STEPS - 1
    assert log.records[-1] == (last, {"loss": 2.0 + (last % 7) / 100, "lr": 1e-4})
    assert peak < 2.0, f"{peak:.1f} MB traced"


_PIECES = st.lists(
    st.sampled_from(["a", "=", "é", " ", "\r", "\n", "\r\n", "\x0b", "\x85", "[x=1]", "1/9"]), max_size=80
)


@settings(max_examples=100, deadline=None)
@given(pieces=_PIECES, block=st.integers(1, 9))
def test_streamed_redraws_are_the_texts_split_at_each_return_and_newline(tmp_path_factory, pieces, block):
    text = "".join(pieces)
    path = tmp_path_factory.mktemp("redraws") / "log.txt"
    path.write_bytes(text.encode())
    if not text.encode().strip():
        with pytest.raises(LogReadError, match="empty"):
            list(read_lines(path, at_returns=True, block_bytes=block).lines)
        return
    assert list(read_lines(path, at_returns=True, block_bytes=block).lines) == re.split(r"[\r\n]", text)


_BAR = st.tuples(
    st.sampled_from(["train", "Epoch 1", "Epoch 2", "eval", ""]),
    st.integers(0, 12),
    st.one_of(st.none(), st.integers(1, 12)),
    st.floats(0.1, 9.0, allow_nan=False).map(lambda v: f"{v:.3g}"),
    st.sampled_from(["\r", "\n", "\r\n"]),
)


def _draw(desc: str, n: int, total: int | None, loss: str) -> str:
    count = f"{n}/{total}" if total is not None else f"{n}it"
    return f"{desc}: {count} [00:01, 1.00it/s, loss={loss}]"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(redraws=st.lists(_BAR, min_size=1, max_size=40))
def test_a_bar_log_reads_the_same_drawn_on_one_line_or_on_many(tmp_path_factory, redraws, monkeypatch_blocks):
    # the same redraws, separated by returns (one line) or newlines (a non-terminal tqdm): the same records
    folder = tmp_path_factory.mktemp("bars")
    results = []
    for separator in ("\r", "\n"):
        path = folder / f"{len(results)}.log"
        path.write_text(
            "".join(_draw(d, n, t, loss) + (separator if s != "\r\n" else s) for d, n, t, loss, s in redraws)
        )
        try:
            log = read_log(path, format="tqdm")
            results.append((list(log.records), log.notes))
        except LogReadError as exc:
            results.append(str(exc).split(": ", 1)[1])
    assert results[0] == results[1]


@pytest.fixture
def monkeypatch_blocks():
    """Blocks of 64 bytes: redraws cut across blocks (set for the whole test; hypothesis reuses it)."""
    import keel.doctor._text as text

    saved = text.BLOCK_BYTES
    text.BLOCK_BYTES = 64
    yield
    text.BLOCK_BYTES = saved
