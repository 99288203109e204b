"""Reading a store back with every value's type checked: a store file is untrusted input.

SQLite columns are dynamically typed: an INTEGER column holds text or a BLOB as readily as an integer when a
program (or a crafted file) puts them there. The readers name each table's columns with the type they must
have (`Column`) and read them through `StoreFile.rows`; a row with a value of the wrong type is left out and
counted (`StoreFile.problems` says how many and why), so one bad row costs that row, never the table, the
run or the page that shows it. A file that is not SQLite, or lacks a table or a required column, raises one
`StoreError` that names the file and what is missing.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from keel.store.schema import StoreError, connect_for_reading

Kind = Literal["int", "real", "text"]
_ALLOWED = {"int": "an integer", "real": "a number", "text": "text"}
_TYPES = {"int": frozenset({int}), "real": frozenset({int, float}), "text": frozenset({str})}
STREAM_CHUNK = 1000  # rows `StoreFile.stream` fetches at a time


@dataclass(frozen=True)
class Column:
    """One column a reader selects, and the type its values must have.

    Attributes:
        name: The column's name.
        kind: ``"int"`` (an SQLite integer; a real, even 3.0, is refused), ``"real"`` (an integer or a
            real) or ``"text"``.
        nullable: NULL is allowed (read as None); such a column may also be missing from the table (a store
            an older keel wrote), and then reads as None.
    """

    name: str
    kind: Kind
    nullable: bool = False

    @property
    def types(self) -> frozenset[type]:
        """The Python types SQLite hands back for a value that fits (NoneType for NULL when nullable)."""
        return _TYPES[self.kind] | ({type(None)} if self.nullable else set())

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit this column, or None when it does."""
        if type(value) in self.types:
            return None
        shown = "NULL" if value is None else describe(value)
        return f"{self.name} is {shown}; allowed: {_ALLOWED[self.kind]}"


def describe(value: Any, limit: int = 40) -> str:
    """A short, printable account of a stored value and its SQLite type (for notes and error messages)."""
    sqlite_type = {int: "integer", float: "real", str: "text", bytes: "blob"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text[:limit]}{'…' if len(text) > limit else ''} ({sqlite_type})"


def parse_json(text: str) -> Any:
    """The JSON value of ``text``; ValueError when it is not JSON (RecursionError too: nesting 100k deep)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_meta(file: StoreFile) -> dict[str, Any]:
    """A store's ``meta`` table (text keys, JSON values); an entry whose value is not JSON is left out and
    counted."""
    out = {}
    for key, value in file.rows("meta", (Column("key", "text"), Column("value", "text"))):
        try:
            out[key] = parse_json(value)
        except ValueError as exc:
            file.drop("meta", f"the value of {describe(key)} is not JSON ({exc})")
    return out


@dataclass
class _Dropped:
    count: int = 0
    first: str = ""


class StoreFile:
    """A read-only connection to one store file, reading typed columns and counting the rows left out.

    Args:
        path: The SQLite file.
        what: What the file should be, for messages (``"run store"``).

    Raises:
        FileNotFoundError: No file at ``path``.
        StoreError: The file is not an SQLite database.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        if not path.is_file():
            raise FileNotFoundError(f"no keel {what} at {path}")
        self.conn = connect_for_reading(path)
        try:
            self.conn.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(f"{path}: not an SQLite {what} ({exc})") from None
        self._dropped: dict[str, _Dropped] = {}

    def close(self) -> None:
        self.conn.close()

    def columns(self, table: str) -> set[str]:
        """The columns ``table`` has now (a live writer may create tables after this file was opened)."""
        return {row[1] for row in self.conn.execute(f'PRAGMA table_info("{table}")')}

    def distinct(self, table: str, column: str) -> list[Any]:
        """The distinct values of one column, sorted, whatever their type (the caller checks them).

        Raises:
            StoreError: The table or the column is missing.
        """
        self._require(table, [column])
        return [v for (v,) in self.conn.execute(f'SELECT DISTINCT "{column}" FROM "{table}" ORDER BY 1')]

    def rows(
        self,
        table: str,
        columns: Sequence[Column],
        *,
        where: str = "1",
        params: Sequence[Any] = (),
        order: str = "rowid",
    ) -> list[tuple[Any, ...]]:
        """The rows of ``table`` (those meeting the SQL condition ``where``) whose every value fits its
        `Column`, in ``order``; the others are counted.

        ``table``, ``where`` and ``order`` are the reader's own SQL, never text from the store.

        Raises:
            StoreError: The table, or a column that is not nullable, is missing.
        """
        data = self.conn.execute(self._select(table, columns, where, order), tuple(params)).fetchall()
        return self._fitting(table, columns, data)

    def stream(
        self,
        table: str,
        columns: Sequence[Column],
        *,
        where: str = "1",
        params: Sequence[Any] = (),
        order: str = "rowid",
    ) -> Iterator[tuple[Any, ...]]:
        """`rows`, read `STREAM_CHUNK` rows at a time: a table of millions of rows is never held whole. The rows
        left out are counted as they are read (`problems` is complete when the last row has been read).

        Raises:
            StoreError: The table, or a column that is not nullable, is missing.
        """
        cursor = self.conn.execute(self._select(table, columns, where, order), tuple(params))
        chunks = iter(functools.partial(cursor.fetchmany, STREAM_CHUNK), [])
        return itertools.chain.from_iterable(self._fitting(table, columns, data) for data in chunks)

    def _fitting(self, table: str, columns: Sequence[Column], data: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The rows of ``data`` whose every value fits its column; the others counted."""
        # A column at a time, the set of types it holds (C loops; a long signal costs no Python per value);
        # row by row only when some value does not fit.
        if all(set(map(type, map(itemgetter(i), data))) <= c.types for i, c in enumerate(columns)):
            return data
        good = []
        for row in data:
            problem = next((p for c, v in zip(columns, row, strict=True) if (p := c.problem(v))), None)
            if problem is None:
                good.append(row)
            else:
                self.drop(table, problem)
        return good

    def _select(self, table: str, columns: Sequence[Column], where: str, order: str) -> str:
        """The query of ``columns`` (NULL for a nullable one the table lacks) meeting ``where``, in ``order``."""
        present = self._require(table, [c.name for c in columns if not c.nullable])
        select = ", ".join(f'"{c.name}"' if c.name in present else "NULL" for c in columns)
        return f'SELECT {select} FROM "{table}" WHERE ({where}) ORDER BY {order}'

    def _require(self, table: str, names: Sequence[str]) -> set[str]:
        present = self.columns(table)
        if not present:
            raise StoreError(f"{self.path}: this {self.what} has no table {table!r}")
        missing = [name for name in names if name not in present]
        if missing:
            raise StoreError(
                f"{self.path}: table {table!r} of this {self.what} lacks the column(s) "
                f"{', '.join(missing)} (it has {', '.join(sorted(present))})"
            )
        return present

    def drop(self, table: str, reason: str, count: int = 1) -> None:
        """Count ``count`` rows of ``table`` left out, for ``reason`` (the first reason is kept)."""
        dropped = self._dropped.setdefault(table, _Dropped(first=reason))
        dropped.count += count

    @property
    def problems(self) -> list[str]:
        """One line per table that had rows left out: how many, and why the first one was."""
        return [
            f"{table}: {d.count} row(s) of the wrong type left out (first: {d.first})"
            for table, d in sorted(self._dropped.items())
        ]
