"""The run store's SQLite schema (one file per run: ``run_dir/run.sqlite``).

SQLite stores a NaN REAL as NULL; readers turn NULL values back into NaN.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from keel._core.errors import KeelError

SCHEMA_VERSION = 1  # PRAGMA user_version of a run store: a store of a higher one was written by a newer keel
STORE_SUFFIX = ".sqlite"  # what marks a path as a store file rather than the folder holding one
STORE_NAME = "run.sqlite"

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signals (step INTEGER NOT NULL, key TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS signals_key_step ON signals (key, step);
CREATE TABLE IF NOT EXISTS findings (
    step INTEGER NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, signal TEXT NOT NULL,
    value REAL, baseline REAL, evidence TEXT NOT NULL, cause TEXT NOT NULL, advice TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    step INTEGER NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL,
    onset INTEGER, restored_step INTEGER
);
CREATE TABLE IF NOT EXISTS batches (step INTEGER NOT NULL, ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    step INTEGER NOT NULL, path TEXT NOT NULL, checksum TEXT NOT NULL, created REAL NOT NULL
);
"""


class StoreError(KeelError, sqlite3.OperationalError):
    """A store that cannot be read: not an SQLite file, or a table or a required column is missing; or one
    that cannot be written: a newer keel wrote it.

    Also an `sqlite3.OperationalError` (what SQLite raises for a missing table), so code that already handles
    a broken SQLite file handles this one.
    """


def store_path(run_dir: str | Path) -> Path:
    """``run_dir/run.sqlite``, or the path itself when it already names a ``.sqlite`` file."""
    path = Path(run_dir)
    return path if path.suffix == STORE_SUFFIX else path / STORE_NAME


def store_folder(path: str | Path) -> Path:
    """The folder a run or sweep store lies in: ``path`` itself, or its parent when it names a ``.sqlite`` file.

    The inverse of `store_path` and `keel.store.sweep_store_path` for a folder.

    Example:
        >>> store_folder("runs/a/run.sqlite"), store_folder("runs/a")
        (PosixPath('runs/a'), PosixPath('runs/a'))
    """
    path = Path(path)
    return path.parent if path.suffix == STORE_SUFFIX else path


def stored_version(conn: sqlite3.Connection) -> int:
    """The schema version a store was written with (0 for a new, empty file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def newer_version_note(path: Path, version: int) -> str:
    """What a store of a ``version`` above `SCHEMA_VERSION` is, for the error or warning that names it."""
    return f"{path}: written by a newer keel (store version {version}; this keel writes version {SCHEMA_VERSION})"


def connect_for_writing(path: Path) -> sqlite3.Connection:
    """A connection that writes the store at ``path``, creating it (and its folder) if missing.

    A store that already has this keel's tables is not written here: a run killed on a disk that is full by the
    time it restarts opens its store and resumes (its rows are then dropped with a warning until there is room,
    as for any failed write), where stamping the version again stopped the resume with "database or disk is full".

    Raises:
        StoreError: A newer keel wrote the store (it is left as it is: neither written nor stamped older); or
            the store cannot be opened for writing (a full disk, an I/O error): the message names the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        version = stored_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{newer_version_note(path, version)}: not written; allowed: upgrade keel to write it")
        conn.execute("PRAGMA journal_mode=WAL")  # (a store in WAL mode already: nothing written)
        # NORMAL in WAL mode: a committed transaction survives a process kill (only an OS crash or power loss
        # can lose the last transactions), at a fraction of FULL's fsync cost.
        conn.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION or _missing_objects(conn):
            conn.executescript(DDL)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, StoreError):
            raise StoreError(
                f"{path}: cannot be opened for writing ({exc}); allowed: a store on a disk with room"
            ) from exc
        raise
    return conn


_DDL_OBJECTS = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", DDL))


def _missing_objects(conn: sqlite3.Connection) -> bool:
    """Whether a table or index of `DDL` is missing (a store from a keel before it was added); a read only."""
    names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    return not _DDL_OBJECTS <= names


def connect_for_reading(path: Path) -> sqlite3.Connection:
    """A read-only connection to a store file that leaves its folder as it found it.

    A store closed cleanly holds everything in its main file: it is opened ``immutable=1``, which takes no lock
    and creates no ``-shm``/``-wal`` files (a read-only connection in WAL mode creates them and, unlike a writer,
    cannot remove them when it closes). A store with a ``-wal`` (a live writer, or one killed) or a hot
    ``-journal`` keeps committed rows outside the main file: it is opened ``mode=ro``, which reads them. A writer
    that opens the store after this check and checkpoints while the read goes on can make that read fail; it
    never changes what is stored. The path travels as a ``file:`` URI with its ``#``, ``?`` and ``%`` escaped.
    """
    live = any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-journal"))
    return sqlite3.connect(f"{path.absolute().as_uri()}?{'mode=ro' if live else 'immutable=1'}", uri=True)
