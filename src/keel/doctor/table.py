"""LogTable: a log's records kept column by column, so a million-row log costs a few arrays, not a million dicts.

Row ``i`` is the ``i``-th record in file order and ``steps[i]`` its step. Each column keeps only the rows that
logged it (`Column.rows`, increasing) and their values, so a sparse log — an eval loss every 500 steps, one
TensorBoard tag per parameter — costs what it holds, not rows × columns. A `LogTable` is also a read-only
sequence of ``(step, {column: value})`` records, the shape every reader produced before, for code that wants
records (small logs, tests).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

# Steps are kept as int64 and subtracted from each other (strides, gaps): within ±2**61 neither overflows.
MAX_STEP = 2**61
_BLOCK = 8192  # records materialised at a time when a table is iterated


@dataclass(frozen=True, eq=False)
class Column:
    """The records that logged one column, and the values they hold.

    Attributes:
        rows: Row numbers, increasing (int64).
        values: The value logged in each of those rows (float64; NaN and ±inf as written).
    """

    rows: np.ndarray
    values: np.ndarray


class LogTable(Sequence[tuple[int, dict[str, float]]]):
    """A log's records, column by column.

    Args:
        steps: One step per record, in file order.
        columns: Column name → `Column`, in the order the names first appear in the file.

    Example:
        >>> table = LogTable.from_records([(0, {"loss": 2.5}), (10, {"loss": 2.4, "eval_loss": 2.6})])
        >>> len(table), table.steps.tolist(), table[1]
        (2, [0, 10], (10, {'loss': 2.4, 'eval_loss': 2.6}))
    """

    def __init__(self, steps: np.ndarray | None = None, columns: Mapping[str, Column] | None = None) -> None:
        self.steps = np.zeros(0, dtype=np.int64) if steps is None else np.asarray(steps, dtype=np.int64)
        self.columns: dict[str, Column] = _share_full_rows(len(self.steps), dict(columns or {}))

    @classmethod
    def from_records(cls, records: Iterable[tuple[int, Mapping[str, float]]]) -> LogTable:
        """A table from ``(step, {column: value})`` records.

        Raises:
            ValueError: A step that is not an integer within ±2**61, or a value that is not a number.
        """
        builder = TableBuilder()
        for i, (step, values) in enumerate(records):
            try:
                step = operator.index(step)
                if not -MAX_STEP < step < MAX_STEP:
                    raise ValueError
                builder.add(step, {name: float(v) for name, v in values.items()})
            except (TypeError, ValueError, OverflowError):
                raise ValueError(
                    f"record {i}: step {step!r} with values {values!r}; allowed: an integer step "
                    f"within ±2**61 and numeric values"
                ) from None
        return builder.build()

    def __len__(self) -> int:
        return len(self.steps)

    @overload
    def __getitem__(self, index: int) -> tuple[int, dict[str, float]]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, dict[str, float]]]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, dict[str, float]] | list[tuple[int, dict[str, float]]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        values = {}
        for name, col in self.columns.items():
            at = int(np.searchsorted(col.rows, i))
            if at < len(col.rows) and col.rows[at] == i:
                values[name] = float(col.values[at])
        return int(self.steps[i]), values

    def __iter__(self) -> Iterator[tuple[int, dict[str, float]]]:
        cursors = dict.fromkeys(self.columns, 0)
        for start in range(0, len(self), _BLOCK):
            stop = min(start + _BLOCK, len(self))
            rows: list[dict[str, float]] = [{} for _ in range(stop - start)]
            for name, col in self.columns.items():
                lo = cursors[name]
                hi = int(np.searchsorted(col.rows, stop))
                for row, value in zip(col.rows[lo:hi].tolist(), col.values[lo:hi].tolist(), strict=True):
                    rows[row - start][name] = value
                cursors[name] = hi
            yield from zip(self.steps[start:stop].tolist(), rows, strict=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (LogTable, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LogTable({len(self)} records, columns {list(self.columns)})"


class TableBuilder:
    """Builds a `LogTable` one record at a time (readers whose records arrive one by one: JSON, TensorBoard).

    Example:
        >>> b = TableBuilder()
        >>> b.add(0, {"loss": 2.0}); b.add(1, {"loss": 1.9, "lr": 0.1})
        >>> b.build()[1]
        (1, {'loss': 1.9, 'lr': 0.1})
    """

    def __init__(self) -> None:
        self._steps = array("q")
        # a column's row numbers, None while it has logged every record so far (rows 0, 1, 2 …: not stored)
        self._rows: dict[str, array | None] = {}
        self._values: dict[str, array] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, values: Mapping[str, float]) -> None:
        """Append one record; ``step`` must be within ±2**61 (`parse_step` makes sure of it)."""
        row = len(self._steps)
        self._steps.append(step)
        for name, value in values.items():
            logged = self._values.get(name)
            if logged is None:
                logged = self._values[name] = array("d")
                self._rows[name] = None if row == 0 else array("q")
            rows = self._rows[name]
            if rows is None and len(logged) < row:  # its first gap: from here on its rows are kept
                rows = self._rows[name] = array("q", range(len(logged)))
            if rows is not None:
                rows.append(row)
            logged.append(value)

    def build(self) -> LogTable:
        columns = {}
        for name, logged in self._values.items():
            rows = self._rows[name]
            columns[name] = Column(
                rows=np.arange(len(logged), dtype=np.int64) if rows is None else np.frombuffer(rows, dtype=np.int64),
                values=np.frombuffer(logged, dtype=np.float64),
            )
        return LogTable(np.frombuffer(self._steps, dtype=np.int64), columns)


class Scalars:
    """Scalars that arrive one value at a time, each with its write time and tag (TensorBoard's events, MLflow's
    metric series), kept in arrays (a long run writes millions), then put together as records (`records`).

    Example:
        >>> s = Scalars()
        >>> s.add(1.0, 0, 0, 0, "loss", 2.0); s.add(1.0, 1, 0, 0, "lr", 0.1); s.add(2.0, 0, 1, 1, "loss", 1.9)
        >>> list(s.records())
        [(0, {'loss': 2.0, 'lr': 0.1}), (1, {'loss': 1.9})]
    """

    def __init__(self) -> None:
        self.wall, self.value = array("d"), array("d")
        self.rank, self.order, self.steps, self.tag = array("q"), array("q"), array("q"), array("q")
        self.tags: dict[str, int] = {}
        self.skipped = self.malformed = 0

    def add(self, wall: float, rank: int, order: int, step: int, tag: str, value: float) -> None:
        """One value: its write time (NaN when unknown), its source's rank and order within that source (the tie
        breaks), its step, tag and value."""
        self.wall.append(wall)
        self.rank.append(rank)
        self.order.append(order)
        self.steps.append(step)
        self.tag.append(self.tags.setdefault(tag, len(self.tags)))
        self.value.append(value)

    def extend(self, tag: str, rank: int, wall: np.ndarray, steps: np.ndarray, values: np.ndarray) -> None:
        """A whole series of one tag at once, in its own write order (steps within ±2**61)."""
        count = len(values)
        self.wall.frombytes(np.ascontiguousarray(wall, np.float64).tobytes())
        self.rank.frombytes(np.full(count, rank, np.int64).tobytes())
        self.order.frombytes(np.arange(count, dtype=np.int64).tobytes())
        self.steps.frombytes(np.ascontiguousarray(steps, np.int64).tobytes())
        self.tag.frombytes(np.full(count, self.tags.setdefault(tag, len(self.tags)), np.int64).tobytes())
        self.value.frombytes(np.ascontiguousarray(values, np.float64).tobytes())

    def records(self, *, by_step: bool = False) -> LogTable:
        """One record per run of same-step scalars in write order (wall time; an event without a usable wall
        time, NaN, sorts last), a tag met again in the run starting a new record. ``by_step``: in step order
        first, write order within a step (series written apart, with no order across them: MLflow's)."""
        keys = [np.frombuffer(self.order, np.int64), np.frombuffer(self.rank, np.int64)]
        keys.append(np.frombuffer(self.wall, np.float64))
        if by_step:
            keys.append(np.frombuffer(self.steps, np.int64))
        order = np.lexsort(keys)
        names = list(self.tags)
        steps, tags = np.frombuffer(self.steps, np.int64)[order], np.frombuffer(self.tag, np.int64)[order]
        if not _pairs_repeat(steps, tags):
            return self._table(steps, tags, np.frombuffer(self.value, np.float64)[order], names)
        builder = TableBuilder()
        last_step, current = None, {}
        for start in range(0, len(order), 1 << 16):
            block = order[start : start + (1 << 16)]
            for step, tag, value in zip(
                np.frombuffer(self.steps, np.int64)[block].tolist(),
                np.frombuffer(self.tag, np.int64)[block].tolist(),
                np.frombuffer(self.value, np.float64)[block].tolist(),
                strict=True,
            ):
                name = names[tag]
                if step == last_step and name not in current:
                    current[name] = value
                else:
                    if last_step is not None:
                        builder.add(last_step, current)
                    last_step, current = step, {name: value}
        builder.add(last_step, current)  # type: ignore[arg-type]
        return builder.build()

    @staticmethod
    def _table(steps: np.ndarray, tags: np.ndarray, values: np.ndarray, names: list[str]) -> LogTable:
        """`records` when no tag is logged twice at one step: a record starts wherever the step changes, so the
        table is built with array operations instead of a loop over every value."""
        new_record = np.r_[True, steps[1:] != steps[:-1]]
        rows = np.cumsum(new_record) - 1
        by_tag = np.argsort(tags, kind="stable")  # each tag's values together, in record order
        tag_ids, first, counts = np.unique(tags[by_tag], return_index=True, return_counts=True)
        first_seen = np.unique(tags, return_index=True)[1]  # where each tag first appears: the columns' order
        columns = {}
        for i in np.argsort(first_seen, kind="stable").tolist():
            picked = by_tag[first[i] : first[i] + counts[i]]
            columns[names[int(tag_ids[i])]] = Column(rows=rows[picked], values=values[picked])
        return LogTable(steps[new_record], columns)


def _share_full_rows(count: int, columns: dict[str, Column]) -> dict[str, Column]:
    """``columns`` with every column that logged all ``count`` records given one shared, read-only ``rows`` (0 …
    count - 1): a dense log's row numbers are held once, not once per column (8 bytes per value each)."""
    shared = None
    for name, col in columns.items():
        rows = col.rows
        # rows increase, so count of them from 0 to count - 1 are all of them
        if len(rows) == count and count and rows[0] == 0 and rows[-1] == count - 1 and rows is not shared:
            if shared is None:
                shared = np.arange(count, dtype=np.int64)
                shared.flags.writeable = False
            columns[name] = Column(rows=shared, values=col.values)
    return columns


def _pairs_repeat(steps: np.ndarray, tags: np.ndarray) -> bool:
    """Whether some tag is logged twice at one step."""
    if len(steps) < 2:
        return False
    order = np.lexsort((tags, steps))
    steps, tags = steps[order], tags[order]
    return bool(np.any((steps[1:] == steps[:-1]) & (tags[1:] == tags[:-1])))
