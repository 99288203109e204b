"""Claiming a run_dir for one `Guard`: a lock while it is open, one run per folder, and the run's identity.

A run_dir holds one run: its store (``run.sqlite``, written by rank 0) and its disk snapshots (``snapshots/``, or
``rank-<r>/snapshots`` under torchrun). Under a process group that is a subgroup of the job, each group's run is in
``run_dir/group-<g>`` (`_group_folder`). A folder that already holds a run is opened by an explicit choice:
continue that run (``resume=True``), start a new one in its place (``overwrite=True``: keel's files there are
deleted first), or use another folder. Mixing two runs in one folder is what once let a resumed run load the
weights of an older run whose snapshots had higher step numbers.

While a Guard is open, its process holds an exclusive ``flock`` on ``.keel.lock`` (rank 0 in the run_dir, every
other rank in its ``rank-<r>`` folder), so a second Guard on the same folder — in this process or in another —
gets a clear error instead of both writing into one store. The operating system drops the lock with the process,
so a run killed with ``kill -9`` leaves no stale lock behind. (Where ``fcntl`` does not exist, on Windows, the
folder is not locked.)

Every run has an id, `RunDir.run_id`, stored in the run store's meta and in each disk snapshot: a resume keeps
the id of the run it continues and loads only that run's snapshots.

Under ``torch.distributed`` the claim is a collective: every rank inspects and locks its own part, and when any
rank cannot go on, every rank raises (a rank that went on alone would wait forever in the first all-reduce).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from keel.data.skip_list import SKIP_LIST_NAME
from keel.guard.distributed import RankSync
from keel.recover.disk import PARTIAL_PREFIX, SNAPSHOT_DIR, is_snapshot_folder
from keel.store.schema import STORE_NAME, connect_for_reading

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".keel.lock"
STORE_FILES = (STORE_NAME, f"{STORE_NAME}-wal", f"{STORE_NAME}-shm")
EXPORT_DIR = "export"  # where `keel export` writes by default: derived from the run, so it goes with it
_ID_BYTES = 16


@dataclass
class Held:
    """What this rank's part of a run_dir holds from an earlier run.

    Attributes:
        store: The run store's ``status``, ``steps`` and ``run_id`` (None where there is no store).
        unreadable: Why the store could not be read, when it could not.
        snapshots: The number of disk snapshot folders.
        snapshot_dir: Where they are.
    """

    store: dict[str, Any] | None = None
    unreadable: str | None = None
    snapshots: int = 0
    snapshot_dir: str = ""

    @property
    def a_run(self) -> bool:
        """Whether there is anything to lose: a store with steps, an unreadable store, or snapshots.

        A store that recorded no step (a run that failed while starting) holds nothing worth keeping.
        """
        return self.unreadable is not None or self.snapshots > 0 or (self.store is not None and self.store["steps"] > 0)

    def describe(self) -> str:
        parts = []
        if self.unreadable is not None:
            parts.append(f"a run store keel cannot read ({self.unreadable})")
        elif self.store is not None:
            parts.append(f"a run store (status {self.store['status']}, {self.store['steps']} steps)")
        if self.snapshots:
            parts.append(f"{self.snapshots} disk snapshot{'s' * (self.snapshots != 1)} in {self.snapshot_dir}")
        return " and ".join(parts)


class RunDir:
    """A run_dir claimed by one `Guard`; `release` (at ``Guard.close``) gives it up.

    Build it with `RunDir.claim`.

    Attributes:
        path: The run_dir; None when the run keeps everything in memory.
        store_dir: Where this process writes the run store (None on ranks other than 0, and without a run_dir).
        snapshot_dir: This rank's folder for disk snapshots (``<snapshot_dir>/snapshots``).
        run_id: The run's id: a new one, or the id of the run a resume continues.
        resumes: The id of the run whose snapshots a resume may load; None when any may be (a store written
            before keel gave runs an id, or no store at all).
        resumes_steps: The steps recorded in the store of the run a resume continues (0 when there is none).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        store_dir: str | None,
        snapshot_dir: str | None,
        run_id: str,
        resumes: str | None,
        locks: list[IO[str]],
        resumes_steps: int = 0,
    ) -> None:
        self.path, self.store_dir, self.snapshot_dir = path, store_dir, snapshot_dir
        self.run_id, self.resumes, self.resumes_steps = run_id, resumes, resumes_steps
        self._locks = locks

    @classmethod
    def claim(cls, run_dir: str | None, *, resume: bool, overwrite: bool, sync: RankSync | None = None) -> RunDir:
        """Lock ``run_dir`` for this run and decide whose run it holds.

        Args:
            run_dir: The folder (it exists: `Guard` created it), or None to keep everything in memory.
            resume: Continue the run the folder holds (a folder that holds none starts a new run).
            overwrite: Delete keel's files in the folder (run store, snapshots, exports), then start a new run.
            sync: The ranks of a distributed run (None in a single process).

        Raises:
            ValueError: The folder holds a run and neither ``resume`` nor ``overwrite`` was given; another Guard
                has it open; both ``resume`` and ``overwrite`` were given. (`Guard` checks their types first.)
        """
        if overwrite and resume:
            raise ValueError(
                "resume=True and overwrite=True; allowed: one of them (resume continues the run in "
                "run_dir, overwrite deletes it and starts a new one)"
            )
        if run_dir is None:
            if overwrite:
                raise ValueError("overwrite=True needs run_dir; allowed: the run_dir to start over in")
            return cls(None, store_dir=None, snapshot_dir=None, run_id=new_run_id(), resumes=None, locks=[])
        path = _group_folder(Path(run_dir), sync)
        rank, world = (sync.rank, sync.world) if sync is not None else (0, 1)
        own = path / f"rank-{rank}" if sync is not None else path
        locks: list[IO[str]] = []
        problem = _lock(path if rank == 0 else own, locks)
        held = Held()
        if problem is None:
            held = _inspect(path if rank == 0 else None, own)
            if held.a_run and not (resume or overwrite):
                problem = (
                    f"run_dir {str(path)!r} holds a previous run: {held.describe()}; allowed: resume=True to "
                    "continue it, another run_dir, or overwrite=True to delete keel's files there "
                    f"({STORE_NAME}, {SNAPSHOT_DIR}/, {EXPORT_DIR}/, {SKIP_LIST_NAME}) and start a new run"
                )
            elif resume and held.unreadable is not None:
                problem = (
                    f"resume=True: run_dir {str(path)!r} holds {held.describe()}, so the run to continue is "
                    "unknown; allowed: overwrite=True to start a new run there, or another run_dir"
                )
            elif resume and rank == 0:
                problem = _other_world(path, world if sync is not None else None)
        resumes = held.store.get("run_id") if resume and held.store is not None else None
        run_id = resumes or new_run_id()
        if sync is not None:
            problem, run_id, resumes = _agree(sync, problem, run_id, resumes, path)
        if problem is not None:
            unlock(locks)
            raise ValueError(problem)
        if overwrite or (held.store is not None and not held.a_run):
            _clear(path if rank == 0 else None, own, world=world if sync is not None else None)
        _clear_partial_writes(path if rank == 0 else None, own)
        steps = held.store["steps"] if resume and held.store is not None else 0
        return cls(
            path,
            store_dir=str(path) if rank == 0 else None,
            snapshot_dir=str(own),
            run_id=run_id,
            resumes=resumes,
            locks=locks,
            resumes_steps=steps,
        )

    def release(self) -> None:
        """Give up the lock (safe to call twice)."""
        unlock(self._locks)


def new_run_id() -> str:
    return uuid.uuid4().hex


def valid_run_id(value: object) -> str | None:
    """``value`` when it is a run id (32 hex digits), else None."""
    if isinstance(value, str) and len(value) == 2 * _ID_BYTES and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _group_folder(run_dir: Path, sync: RankSync | None) -> Path:
    """Where this rank's group keeps its run: ``run_dir`` itself, or ``run_dir/group-<g>`` under a process group
    that is a subgroup of the job (``DistributedConfig(process_group=)``, the data-parallel group of a 2-D job), ``g``
    the job-wide rank of the group's rank 0. Every group's Guard writes its own store and rank folders (numbered
    within the group), so groups sharing the job's one run_dir collided there: one group failed, blaming "another
    open Guard", or a group that started later found the other's store and refused it as a previous run."""
    if sync is None or sync.leader is None:
        return run_dir
    return run_dir / f"group-{sync.leader}"


# --- the lock -------------------------------------------------------------------------------------------------
def _lock(folder: Path, locks: list[IO[str]]) -> str | None:
    """Take ``folder/.keel.lock``; returns None, or why it could not be taken."""
    return lock_folder(
        folder,
        locks,
        in_use=f"run_dir {str(folder)!r} is in use by another open Guard",
        allowed="close() that Guard first (its lock also goes when its process ends), or another run_dir",
    )


def lock_folder(folder: Path, locks: list[IO[str]], *, in_use: str, allowed: str, name: str = LOCK_NAME) -> str | None:
    """Take an exclusive ``flock`` on ``folder/name`` (kept in ``locks`` until `unlock`), writing this process's id
    into it; returns None, or ``in_use`` with who holds it and what is ``allowed``. The lock goes with the process."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / name, "a+")  # noqa: SIM115 - held until release
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        who = "this process" if holder == str(os.getpid()) else f"process {holder}" if holder else "another process"
        return f"{in_use} ({who} holds {folder / name}); allowed: {allowed}"
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    locks.append(handle)
    return None


def unlock(locks: list[IO[str]]) -> None:
    """Drop the locks `lock_folder` took."""
    while locks:
        locks.pop().close()  # closing the file drops the flock


# --- what a folder holds ----------------------------------------------------------------------------------------
def _inspect(store_dir: Path | None, own: Path) -> Held:
    held = Held(snapshot_dir=str(own / SNAPSHOT_DIR))
    snapshots = own / SNAPSHOT_DIR
    if snapshots.is_dir():
        held.snapshots = sum(1 for p in snapshots.iterdir() if is_snapshot_folder(p))
    if store_dir is not None and (store_dir / STORE_NAME).exists():
        try:
            held.store = _read_store(store_dir / STORE_NAME)
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            held.unreadable = f"{type(exc).__name__}: {exc}"
    return held


def _other_world(path: Path, world: int | None) -> str | None:
    """Why a resume with ``world`` ranks (None: one process, no rank folders) cannot continue the snapshots in
    ``path``: they were written by another number of ranks (each rank restores its own ``rank-<r>`` folder, so
    a rank would start over or load another rank's state)."""
    written = sorted(int(p.name[5:]) for p in path.glob("rank-*") if p.name[5:].isdigit() and _has_snapshots(p))
    single = _has_snapshots(path)
    if not written and not single:
        return None  # nothing to continue from: the run starts over whatever the ranks
    if written == (list(range(world)) if world is not None else []) and single == (world is None):
        return None
    was = " and ".join(
        part
        for part in (
            f"one process ({SNAPSHOT_DIR}/)" if single else "",
            f"{len(written)} ranks (rank-{written[0]}..rank-{written[-1]}/{SNAPSHOT_DIR})" if written else "",
        )
        if part
    )
    now = "one process" if world is None else f"{world} ranks"
    return (
        f"resume=True: run_dir {str(path)!r} holds snapshots written by {was}, and this run has {now}: each rank "
        "continues from its own rank folder, so another number of ranks would start over or load another rank's "
        "state; allowed: resume with the number of ranks the run had, or overwrite=True / another run_dir to "
        "start a new run"
    )


def _has_snapshots(folder: Path) -> bool:
    snapshots = folder / SNAPSHOT_DIR
    return snapshots.is_dir() and any(is_snapshot_folder(p) for p in snapshots.iterdir())


def _read_store(path: Path) -> dict[str, Any]:
    """The status, steps and run id of the run store at ``path`` (read-only; a killed run has no ``steps`` in
    its meta yet, so they are counted from its signals)."""
    conn = connect_for_reading(path)
    try:
        meta = {
            k: json.loads(v)
            for k, v in conn.execute("SELECT key, value FROM meta WHERE key IN ('status', 'steps', 'run_id')")
        }
        (last,) = conn.execute("SELECT MAX(step) FROM signals").fetchone()
    finally:
        conn.close()
    steps = meta.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool):
        steps = last + 1 if isinstance(last, int) else 0
    return {
        "status": str(meta.get("status", "unknown"))[:80],
        "steps": steps,
        "run_id": valid_run_id(meta.get("run_id")),
    }


# --- clearing ---------------------------------------------------------------------------------------------------
def _clear(store_dir: Path | None, own: Path, *, world: int | None) -> None:
    """Delete keel's files of an earlier run: the store, exports and skip list (rank 0) and this rank's snapshots.

    Rank 0 also deletes the snapshots of ranks that do not exist in this run (an earlier run had more ranks) and,
    in a single process, those of any earlier distributed run; every live rank deletes only its own.
    """
    if store_dir is not None:
        for name in (*STORE_FILES, SKIP_LIST_NAME):  # (the skip list: a new run's sampler would pass over the
            _remove(store_dir / name)  # old run's examples, and its entries would join the old ones)
        shutil.rmtree(store_dir / EXPORT_DIR, ignore_errors=True)
        shutil.rmtree(store_dir / SNAPSHOT_DIR, ignore_errors=True)
        for folder in store_dir.glob("rank-*"):
            index = folder.name.removeprefix("rank-")
            if index.isdigit() and (world is None or int(index) >= world):
                shutil.rmtree(folder / SNAPSHOT_DIR, ignore_errors=True)
    shutil.rmtree(own / SNAPSHOT_DIR, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a file, or a folder in its place (a store path that is a folder is refused as unreadable first)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear_partial_writes(store_dir: Path | None, own: Path) -> None:
    """Delete what the writes of a killed process left behind: the temporary folders of snapshot writes and
    deletions (each can be as large as a whole snapshot) and, on rank 0, the skip list's partial file
    (`keel._core.files.write_whole` names it ``.skip_list.json.<pid>.partial``; one was left at every kill during a
    write). Safe: this rank holds the lock, so no live writer owns them."""
    snapshots = own / SNAPSHOT_DIR
    if snapshots.is_dir():
        for tmp in snapshots.glob(f"{PARTIAL_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if store_dir is not None:
        for partial in store_dir.glob(f".{SKIP_LIST_NAME}.*.partial"):
            partial.unlink(missing_ok=True)


# --- ranks agree ------------------------------------------------------------------------------------------------
def _agree(
    sync: RankSync, problem: str | None, run_id: str, resumes: str | None, path: Path
) -> tuple[str | None, str, str | None]:
    """One collective: whether any rank has a problem (each rank raises, naming the first rank that has one), and
    rank 0's run ids for every rank."""
    mine = [float(sync.rank) if problem is not None else -1.0]
    ids = [*_id_values(run_id), *_id_values(resumes)] if sync.rank == 0 else [-1.0] * (2 * (_ID_BYTES + 1))
    agreed = sync.all_max(mine + ids)
    failing = int(agreed[0])
    if failing >= 0 and problem is None:
        problem = (
            f"run_dir {str(path)!r}: rank {failing} of this run could not claim its part of it (see that "
            "rank's error); every rank stops here"
        )
    run_id = _id_from(agreed[1 : 2 + _ID_BYTES]) or run_id
    resumes = _id_from(agreed[2 + _ID_BYTES :])
    return problem, run_id, resumes


def _id_values(run_id: str | None) -> list[float]:
    """[1, bytes...] for a run id; [0, 0...] for None."""
    if valid_run_id(run_id) is None:
        return [0.0] * (_ID_BYTES + 1)
    return [1.0, *map(float, bytes.fromhex(run_id))]  # type: ignore[arg-type]


def _id_from(values: list[float]) -> str | None:
    return bytes(int(v) for v in values[1:]).hex() if values[0] == 1.0 else None
