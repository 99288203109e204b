"""Example ids as compact text: ``"0-31,64-95,7"`` — what a step's batch held, a skip list's entries.

A sequential sampler's batch is one range, so a step costs a few bytes in the run store whatever the batch size;
a shuffled batch is a list of single ids. The same text form is read back by `parse_ids`, which refuses anything
but non-negative integers and ascending ranges (the run store and skip lists are files a user may edit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_IDS = 10_000_000  # a parsed text may name at most this many ids (a typo like "0-99999999999" is refused)
MAX_ID = 2**63 - 1  # an id must fit an int64 tensor and an SQLite integer
MAX_DIGITS = len(str(MAX_ID))


def as_id_list(ids: object, name: str = "batch_ids") -> list[int]:
    """The example ids of ``ids`` as a list of ints: a 1-d integer tensor or array, a range, or a sequence of ints.

    Raises:
        ValueError: ``ids`` is not one of those (a 2-d tensor, floats, bools, text), holds a negative id, or holds
            more than `MAX_IDS` ids.

    Example:
        >>> as_id_list(range(3)), as_id_list([7, 2])
        ([0, 1, 2], [7, 2])
    """
    allowed = "allowed: a 1-d integer tensor, a range or a sequence of non-negative ints"
    if getattr(ids, "ndim", 1) > 1:
        raise ValueError(f"{name} has {ids.ndim} dimensions (shape {tuple(ids.shape)}); {allowed}")  # type: ignore[attr-defined]
    try:
        count = len(ids)  # type: ignore[arg-type]
    except TypeError:
        count = 1
    if count > MAX_IDS:  # before tolist()/list(): range(10**12) would not fit in memory
        raise ValueError(f"{name} holds {count} ids; allowed: at most {MAX_IDS}")
    tolist = getattr(ids, "tolist", None)
    values = tolist() if callable(tolist) else ids
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (range, Sequence)) or isinstance(values, (str, bytes)):
        raise ValueError(f"{name}={ids!r:.80}; {allowed}")
    out = list(values)
    for value in out:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} holds {value!r:.40}; allowed: non-negative integer example ids")
    return out


def format_ids(ids: Iterable[int]) -> str:
    """Ids as ascending, merged ranges: ``"0-3,9"``. Duplicates are kept once; the order is not kept.

    Example:
        >>> format_ids([3, 0, 1, 2, 9, 9])
        '0-3,9'
        >>> format_ids([])
        ''
    """
    parts: list[str] = []
    start = prev = None
    for value in sorted(set(ids)):
        if prev is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(_range_text(start, prev))  # type: ignore[arg-type]
        start = prev = value
    if start is not None:
        parts.append(_range_text(start, prev))  # type: ignore[arg-type]
    return ",".join(parts)


def parse_ids(text: str, *, limit: int = MAX_IDS) -> list[int]:
    """The ids ``format_ids`` wrote, ascending; ``""`` is no ids.

    Ids and ranges may come in any order, overlap and have spaces around them (a hand-edited file); an empty part
    (``"1,,2"``), a sign, a non-ASCII digit or an id past int64 is refused.

    Raises:
        ValueError: ``text`` is not comma-separated ids and ``a-b`` ranges (``a <= b``, non-negative), or names
            more than ``limit`` distinct ids; the message names the text or the part.

    Example:
        >>> parse_ids("0-3,9")
        [0, 1, 2, 3, 9]
    """
    merged = _merged_spans(text)
    if _count(merged) > limit:  # counted before any id is made: "0-99999999999" must cost nothing
        raise ValueError(f"example ids {text[:60]!r} name more than {limit} ids; allowed: at most {limit}")
    return [i for lo, hi in merged for i in range(lo, hi + 1)]


def count_ids(text: str) -> int:
    """How many distinct ids `parse_ids` would make of ``text``, without making them (so the ids of many texts
    can be counted together against one limit first).

    Raises:
        ValueError: ``text`` is not ids and ranges, as `parse_ids` says.

    Example:
        >>> count_ids("0-3,2-5,9"), count_ids("0-99999999999")
        (7, 100000000000)
    """
    return _count(_merged_spans(text))


def _merged_spans(text: str) -> list[list[int]]:
    """The ``[lo, hi]`` ranges ``text`` names, ascending, overlapping and adjacent ones merged."""
    if not isinstance(text, str):
        raise ValueError(f"example ids {text!r:.80}; allowed: text such as '0-31,64'")
    spans = sorted(_span(part, text) for part in text.split(",")) if text else []
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _count(merged: list[list[int]]) -> int:
    return sum(hi - lo + 1 for lo, hi in merged)


def _span(part: str, text: str) -> tuple[int, int]:
    if not part.strip():
        raise ValueError(f"example ids {text[:60]!r} have an empty part; allowed: text such as '0-31,64'")
    lo_text, dash, hi_text = part.partition("-")
    lo = _id(lo_text, part)
    hi = _id(hi_text, part) if dash else lo
    if hi < lo:
        raise ValueError(f"example id range {part.strip()!r:.60} runs backwards; allowed: 'a-b' with a <= b")
    return lo, hi


def _id(text: str, part: str) -> int:
    text = text.strip()
    # isascii: str.isdigit() is True for '٣' and '²'; the length test keeps int() off 5000-digit text
    if not text.isascii() or not text.isdigit() or len(text) > MAX_DIGITS or int(text) > MAX_ID:
        raise ValueError(
            f"example id {part.strip()!r:.60} is not a non-negative integer or an 'a-b' range; "
            f"allowed: ids from 0 to {MAX_ID}"
        )
    return int(text)


def _range_text(start: int, stop: int) -> str:
    return str(start) if start == stop else f"{start}-{stop}"
