"""Example ids as text (`keel._core.example_ids`): what the run store and skip lists hold, and files a user may edit.

The round trip and minimality are properties over any id set; the parser and `as_id_list` face a hostile table:
each bad value gets one ValueError that names it, never another exception.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core.example_ids import MAX_IDS, as_id_list, format_ids, parse_ids

ID_SETS = st.lists(st.integers(0, 300), max_size=80) | st.lists(st.integers(0, 2**62), max_size=10)


@given(ID_SETS)
@settings(max_examples=100, deadline=None)
def test_parse_of_format_is_the_sorted_distinct_ids(ids: list[int]) -> None:
    assert parse_ids(format_ids(ids)) == sorted(set(ids))


@given(ID_SETS)
@settings(max_examples=100, deadline=None)
def test_format_is_minimal_ascending_ranges_that_never_touch(ids: list[int]) -> None:
    text = format_ids(ids)
    parts = text.split(",") if text else []
    spans = [(int(p.partition("-")[0]), int(p.partition("-")[2] or p)) for p in parts]
    for part, (lo, hi) in zip(parts, spans, strict=True):
        assert lo < hi if "-" in part else lo == hi, f"{part!r}: a one-id range is written as the id"
    for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False):
        assert lo > hi + 1, f"{text!r}: two ranges that touch or overlap should be one"
    assert sum(hi - lo + 1 for lo, hi in spans) == len(set(ids))


def test_a_sequential_batch_is_one_range_whatever_its_size() -> None:
    assert format_ids(range(4096, 8192)) == "4096-8191"


def test_the_empty_id_list_round_trips_as_empty_text() -> None:
    assert format_ids([]) == ""
    assert parse_ids("") == []


def test_parse_tolerates_spaces_around_ids_and_any_order() -> None:
    assert parse_ids(" 9, 0-2 ,4") == [0, 1, 2, 4, 9]


HOSTILE_TEXT = [
    " ",
    "-1",
    "3-1",
    "1--2",
    "1-",
    "-",
    "a",
    "1,,2",
    "1,",
    ",1",
    "1 2",
    "+1",
    "1.0",
    "0x10",
    "1_000",
    "٣",  # an Arabic-Indic digit: isdigit() is True for it
    "²",
    "1-99999999999",
    "0-5," * 3 + f"0-{MAX_IDS}",
    "9" * 5000,  # int() itself refuses this many digits, with a message that names no value
    str(2**63),  # past int64: no tensor or SQLite integer holds it
    "1\x002",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=[repr(t)[:24] for t in HOSTILE_TEXT])
def test_parse_ids_refuses_hostile_text_with_one_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_ids(text)
    message = str(caught.value)
    assert "allowed" in message, message
    named = [repr(p.strip())[1:-1][:16] for p in text.split(",")] + [repr(text)[1:-1][:16]]
    assert any(name in message for name in named if name), f"{message!r} names none of {named}"


@pytest.mark.parametrize("value", [None, b"0-3", 7, 1.5, ["0-3"], {"ids": "1"}])
def test_parse_ids_refuses_what_is_not_text_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="allowed: text"):
        parse_ids(value)  # type: ignore[arg-type]


def test_parse_ids_limit_counts_distinct_ids_not_repeats() -> None:
    assert parse_ids("0-9,0-9,5", limit=10) == list(range(10))
    with pytest.raises(ValueError, match="more than 10"):
        parse_ids("0-9,20", limit=10)


@given(st.text(alphabet="0123456789-, ٣x", max_size=30))
@settings(max_examples=100, deadline=None)
def test_parse_ids_never_raises_anything_but_value_error(text: str) -> None:
    try:
        out = parse_ids(text)
    except ValueError:
        return
    assert out == sorted(set(out)) and all(i >= 0 for i in out)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (torch.tensor([4, 2, 9]), [4, 2, 9]),
        (torch.tensor([3], dtype=torch.int32), [3]),
        (torch.arange(5, dtype=torch.uint8), [0, 1, 2, 3, 4]),
        (np.array([5, 1], dtype=np.int64), [5, 1]),
        (np.array([7], dtype=np.uint32), [7]),
        (range(2, 5), [2, 3, 4]),
        ([0, 0, 1], [0, 0, 1]),
        ((6,), [6]),
        ([], []),
        (torch.tensor([], dtype=torch.long), []),
    ],
)
def test_as_id_list_takes_1d_integer_tensors_arrays_ranges_and_lists(ids: object, expected: list[int]) -> None:
    out = as_id_list(ids)
    assert out == expected and all(type(i) is int for i in out)


HOSTILE_IDS = [
    torch.tensor([[0, 1], [2, 3]]),
    np.array([[0, 1]]),
    torch.tensor([0.0, 1.0]),
    np.array([1.0]),
    torch.tensor([True, False]),
    [True, False],
    True,
    [1, -2],
    torch.tensor([3, -1]),
    [1.0, 2.0],
    ["1", "2"],
    "0-3",
    b"\x00\x01",
    None,
    {1, 2},
    {"a": 1},
    [[1, 2]],
    (i for i in range(3)),
    range(-1, 3),
    range(MAX_IDS + 1),
]


@pytest.mark.parametrize("ids", HOSTILE_IDS, ids=[f"{type(v).__name__}-{n}" for n, v in enumerate(HOSTILE_IDS)])
def test_as_id_list_refuses_anything_but_non_negative_integer_ids(ids: object) -> None:
    with pytest.raises(ValueError, match="batch_ids") as caught:
        as_id_list(ids)
    assert "allowed" in str(caught.value)
