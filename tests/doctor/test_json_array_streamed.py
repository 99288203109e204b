"""A JSON array log (``[{"step": 1, "loss": 2.5}, ...]``, as ``json.dump(history, f)`` writes it) is streamed: each
item decoded and put into the table as the file is read, not the whole text and every object held first.

Outside-in: the shape is what ``json.dump`` of a list of metric dicts writes (one line, or ``indent=2``); the
decoding is ``json.JSONDecoder.raw_decode``, checked here against ``json.loads`` on any text.
"""

from __future__ import annotations

import json
import math
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keel.doctor._text as _text
import keel.doctor.jsonl_log as jsonl_log
from keel.doctor import read_log
from keel.doctor.jsonl_log import RepeatedKeys, _array_items
from keel.doctor.log import LogReadError


@pytest.fixture
def tiny_blocks():
    """Blocks of a few characters: items, numbers and white space cut across reads (restored after)."""
    saved = jsonl_log.ARRAY_BLOCK_CHARS
    jsonl_log.ARRAY_BLOCK_CHARS = 3
    yield
    jsonl_log.ARRAY_BLOCK_CHARS = saved


def test_a_json_array_log_is_read_without_holding_the_file(tmp_path, monkeypatch):
    # was: the whole text and every decoded object held before the first went into the table
    path = tmp_path / "history.json"
    history = [{"step": s, "loss": 2.0 + (s % 7) / 100, "lr": 1e-4, "grad_norm": 1.5} for s in range(8000)]
    path.write_text(json.dumps(history, indent=2))
    monkeypatch.setattr(jsonl_log, "ARRAY_BLOCK_CHARS", 1 << 16)  # blocks, and the head format detection reads,
    monkeypatch.setattr(_text, "HEAD_TEXT_BYTES", 1 << 16)  # far smaller than the file
    tracemalloc.start()
    try:
        log = read_log(path)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    assert len(log.records) == 8000 and log.records[7999] == (
        7999,
        {"loss": 2.0 + 7999 % 7 / 100, "lr": 1e-4, "grad_norm": 1.5},
    )
    assert peak < 1.5, f"{peak:.1f} MB traced for a {path.stat().st_size / 1e6:.1f} MB file"  # was 3.0 MB; now 0.6


_SCALARS = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(alphabet='ab"\\é ,[]{}:', max_size=6),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["step", "loss", "a"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.lists(_VALUES, max_size=6), indent=st.sampled_from([None, 0, 2]), tail=st.sampled_from(["", "\n", " \r\n"])
)
def test_streamed_items_are_json_loads_items_whatever_the_blocks(tmp_path_factory, tiny_blocks, items, indent, tail):
    path = tmp_path_factory.mktemp("array") / "log.json"
    text = json.dumps(items, indent=indent) + tail
    path.write_text(text)
    assert _same(list(_array_items(path, RepeatedKeys())), json.loads(text))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet='[]{},:"0123456789.eE-+ \n\ttrufalsnNIiy\\', max_size=40))
def test_any_text_streams_to_json_loads_items_or_is_refused(tmp_path_factory, tiny_blocks, text):
    # attack the streaming decoder: whatever it yields, json.loads of the whole text must give too
    path = tmp_path_factory.mktemp("text") / "log.json"
    path.write_text("[" + text)
    try:
        streamed = list(_array_items(path, RepeatedKeys()))
    except ValueError:
        return  # refused: the reader reads the file whole for json.loads's error
    assert _same(streamed, json.loads("[" + text))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[{"step": 1, "loss": 2.0}', "not valid JSON"),  # cut off
        ('[{"step": 1, "loss": 2.0}] [', "not valid JSON"),  # extra data
        ('[{"step": 1, "loss": 2.0} {"step": 2}]', "not valid JSON"),  # no comma
        ('[{"step": 1, "loss": 2.0},]', "not valid JSON"),  # a trailing comma
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nested too deeply
        ("[1, 2, 3]", "no log object has a step"),
    ],
)
def test_a_bad_array_is_the_same_one_error_as_before(tmp_path, tiny_blocks, text, error):
    path = tmp_path / "log.json"
    path.write_text(text)
    with pytest.raises(LogReadError, match=error):
        read_log(path)
