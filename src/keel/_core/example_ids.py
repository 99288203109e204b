"""Example ids as compact text: ``"0-31,64-95,7"`` — what a step's batch held, a skip list's entries.

A sequential sampler's batch is one range, so a step costs a few bytes in the run store whatever the batch size;
a shuffled batch is a list of single ids. The same text form is read back by `parse_ids`, which refuses anything
but non-negative integers and ascending ranges (the run store and skip lists are files a user may edit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_IDS = 100_000_000  # a parsed text may name at most this many ids (a typo like "0-99999999999" is refused)


def as_id_list(ids: object, name: str = "batch_ids") -> list[int]:
    """The example ids of ``ids`` as a list of ints: a 1-d integer tensor or array, a range, or a sequence of ints.

    Raises:
        ValueError: ``ids`` is not one of those, or holds a negative id or a non-integer.

    Example:
        >>> as_id_list(range(3)), as_id_list([7, 2])
        ([0, 1, 2], [7, 2])
    """
    tolist = getattr(ids, "tolist", None)
    values = tolist() if callable(tolist) else ids
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (range, Sequence)) or isinstance(values, (str, bytes)):
        raise ValueError(
            f"{name}={ids!r:.80}; allowed: a 1-d integer tensor, a range or a sequence of non-negative ints"
        )
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
    """The ids ``format_ids`` wrote, ascending.

    Raises:
        ValueError: ``text`` is not comma-separated ids and ``a-b`` ranges (``a <= b``, non-negative), or names
            more than ``limit`` ids.

    Example:
        >>> parse_ids("0-3,9")
        [0, 1, 2, 3, 9]
    """
    if not isinstance(text, str):
        raise ValueError(f"example ids {text!r:.80}; allowed: text such as '0-31,64'")
    found: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_text, dash, hi_text = part.partition("-")
        lo, hi = _id(lo_text, part), _id(hi_text, part) if dash else None
        hi = lo if hi is None else hi
        if hi < lo:
            raise ValueError(f"example id range {part!r} runs backwards; allowed: 'a-b' with a <= b")
        if len(found) + hi - lo + 1 > limit:
            raise ValueError(f"example ids {text[:60]!r} name more than {limit} ids; allowed: at most {limit}")
        found.update(range(lo, hi + 1))
    return sorted(found)


def _id(text: str, part: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"example id {part!r:.60} is not a non-negative integer or an 'a-b' range")
    return int(text)


def _range_text(start: int, stop: int) -> str:
    return str(start) if start == stop else f"{start}-{stop}"
