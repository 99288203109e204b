"""The disk tier: snapshots flushed to safetensors plus a JSON metadata file, verified on load.

Each snapshot is a folder ``snapshots/step-<N>/`` with ``tensors.safetensors`` and ``meta.json``. It is
written under a temporary name and renamed into place, so a process killed mid-write leaves the previous
snapshot intact. ``meta.json`` holds the SHA-256 of the tensor file; a snapshot that fails the check is
skipped with a warning. Loading reads only safetensors and JSON: nothing is unpickled. A failed write
(full disk, permissions) never stops training: it warns once and keeps the memory ring working.

Each snapshot names the run that wrote it (``run_id`` in ``meta.json``). Retention deletes only what this run
wrote, oldest write first — never another run's snapshots, whatever their step numbers — and a resume loads
only the snapshots of the run it continues.

The parameters a snapshot left out because training cannot change them (`keel.recover.fixed`) are not written
either: ``meta.json`` lists them with a checksum of each, computed here, in the writer's thread, once per parameter.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file

from keel._core.errors import KeelWarning
from keel.recover.disk_format import (
    META,
    TENSORS,
    SnapshotInvalid,
    encode,
    file_sha256,
    meta_checksum,
    read_meta,
    read_snapshot,
    snapshot_step,
)
from keel.recover.fixed import CHECKSUM, FixedTensor, checksum
from keel.recover.snapshot import Snapshot

SNAPSHOT_DIR = "snapshots"  # the disk tier's folder inside a run_dir (or a rank's folder of it)
PARTIAL_PREFIX = ".tmp-step-"  # a snapshot folder being written or deleted; what a killed process left is deleted


class SnapshotCorrupt(KeelWarning):
    """A disk snapshot is damaged or not keel's (the message names the file and the reason); an older one is used."""


def is_snapshot_folder(path: Path) -> bool:
    """Whether ``path`` is a snapshot folder (``step-<N>``); temporary folders of killed writes are not. Whether it
    is a good one is for `read_snapshot` to say."""
    return snapshot_step(path) is not None and path.is_dir()


class DiskSnapshots:
    """Writes snapshots to ``directory`` in a background thread and loads the newest good one.

    Args:
        directory: Where the ``step-<N>`` folders go.
        keep: Complete snapshots of this run kept on disk; its older ones are deleted after a newer one is in place.
        run_id: The run's id, written into each snapshot.
        before_publish: Called in the writer's thread when a snapshot is complete, before it is renamed into
            place: the run store's ``flush``, so that a process killed at any moment leaves a store holding every
            step before its newest disk snapshot (the store commits every 0.5 s and a snapshot is written at once:
            a resume from it left the steps in between out of the store for good).
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int = 2,
        *,
        run_id: str | None = None,
        before_publish: Callable[[], object] | None = None,
    ) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r}; allowed: an int >= 1")
        self.directory = Path(directory)
        self.keep = keep
        self.run_id = run_id
        self.before_publish = before_publish
        self.failures = 0
        self.written: list[tuple[int, str, str]] = []  # (step, path, checksum) of completed writes
        self._own: list[Path] = []  # this run's snapshot folders, oldest write first: the only ones retention deletes
        self.found = 0  # snapshot folders the last load_newest considered (its own run's and others')
        self._older: list[Path] = []  # the run's folders older than the one load_newest returned, oldest first
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _writing and _pending between the loop's thread and the writer
        self._writing = False
        self._pending: Snapshot | None = None  # the newest snapshot due while a write ran: written next
        self.superseded = 0  # due snapshots a newer one replaced while they waited for the running write
        self.evicted = 0  # due snapshots the ring reused before the writer got to them
        self._warned = False
        self._checksums: dict[str, tuple[FixedTensor, str]] = {}  # key -> (the record it was computed for, CRC)

    def save_async(self, snap: Snapshot) -> bool:
        """Write ``snap`` in the background: now, or when the running write ends (a newer due snapshot then takes
        its place: the newest is the one a resume wants). Returns whether it started now."""
        with self._lock:
            if self._writing:
                self.superseded += self._pending is not None
                self._pending = snap
                return False
            self._writing = True
        self._thread = threading.Thread(target=self._write_queue, args=(snap,), name="keel-snapshot-disk", daemon=True)
        self._thread.start()
        return True

    def wait(self) -> None:
        """Return once every due snapshot is written (the one waiting for the running write included)."""
        if self._thread is not None:
            self._thread.join()

    def _write_queue(self, snap: Snapshot | None) -> None:
        while snap is not None:
            self._save_guarded(snap)
            with self._lock:
                snap, self._pending = self._pending, None
                self._writing = snap is not None

    def _save_guarded(self, snap: Snapshot) -> None:
        if not snap.in_use.acquire(blocking=False):
            self.evicted += 1
            return  # already evicted from the ring: its buffers belong to a newer snapshot
        try:
            snap.ready.wait()
            self.save(snap)
        except Exception as exc:  # a disk problem must never reach the training loop
            self.failures += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"keel could not write a snapshot (of step {snap.step}) to {self.directory} "
                    f"({type(exc).__name__}: {exc}); training goes on, that one is in memory only and each "
                    "later one is tried on disk again (this warning is not repeated)",
                    KeelWarning,
                    stacklevel=1,
                )
        finally:
            snap.in_use.release()

    def save(self, snap: Snapshot) -> Path:
        """Write ``snap`` now (the caller's thread); returns its folder.

        When the disk is full, the run's oldest snapshot there is deleted (the newest is always kept) and the write
        tried once more: retention frees room only after a write, so one full disk would otherwise stop every later
        write, and a resume would go back to the last snapshot that fitted.
        """
        try:
            return self._write(snap)
        except Exception as exc:
            if not disk_full(exc) or len(self._own) < 2:
                raise
            remove_snapshot(self._own.pop(0))
            return self._write(snap)

    def _write(self, snap: Snapshot) -> Path:
        final = self.directory / f"step-{snap.step:09d}"
        tmp = self.directory / f"{PARTIAL_PREFIX}{snap.step:09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tensors = {k: t.contiguous() for k, t in snap.tensors.items()}
            meta = {
                "step": snap.step,
                "created": snap.created,
                "run_id": self.run_id,
                "skeleton": encode(snap.skeleton, tensors, "/s"),
                "plain": encode(snap.plain, tensors, "/p"),
                "fixed": {"checksum": CHECKSUM, "tensors": self._fingerprint(snap.fixed)},
            }
            save_file(tensors, str(tmp / TENSORS))
            meta["sha256"] = file_sha256(tmp / TENSORS)
            meta["meta_sha256"] = meta_checksum(meta)
            with open(tmp / META, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if self.before_publish is not None:
                self.before_publish()
            remove_snapshot(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.written.append((snap.step, str(final), meta["sha256"]))
        self._own = [p for p in self._own if p != final] + [final]
        for old in self._own[: -self.keep]:
            remove_snapshot(old)
        del self._own[: -self.keep]
        return final

    def _fingerprint(self, fixed: dict[str, FixedTensor]) -> list[list[object]]:
        """``[key, shape, dtype, checksum]`` of each fixed parameter. A checksum is computed once and again only
        when the parameter's version counter or storage moved; the live tensor is read (fixed parameters do not
        change under ``optimizer.step()``), and must not have moved since the snapshot was taken."""
        rows: list[list[object]] = []
        for key, record in fixed.items():
            digest = record.checksum
            if digest is None:
                cached = self._checksums.get(key)
                if cached is not None and record.tensor is not None and not cached[0].moved(record.tensor):
                    digest = cached[1]
                else:
                    assert record.tensor is not None  # a record without a checksum is a live one
                    digest = checksum(record.tensor)
                    self._checksums[key] = (record, digest)
                if record.moved(record.tensor):  # type: ignore[arg-type]
                    raise RuntimeError(
                        f"the fixed parameter {key.removeprefix('model/')} was written in place after the snapshot"
                    )
            rows.append([key, list(record.shape), record.dtype, digest])
        return rows

    def drop_after(self, step: int) -> None:
        """Delete this run's snapshots newer than ``step`` (after a rollback to ``step`` they describe a timeline
        that was abandoned; a resume must not land there). Waits for a write in flight first."""
        self.wait()
        for folder in [p for p in self._own if (snapshot_step(p) or 0) > step]:
            remove_snapshot(folder)
            self._own.remove(folder)

    def keep_until(self, step: int, of_run: str | None) -> None:
        """A run continued at ``step`` from a state the loop restored (`Guard`'s ``continue_at``): the run
        ``of_run``'s snapshots past ``step`` are deleted (a future the loop does again: a resume must not land
        there), its earlier ones become this run's own for retention; another run's are left alone."""
        for folder in self.complete():
            owner = _run_of(folder)
            if of_run is not None and owner is not _UNREADABLE and owner != of_run:
                continue
            if (snapshot_step(folder) or 0) > step:
                remove_snapshot(folder)
            elif folder not in self._own:
                self._own.append(folder)

    def complete(self) -> list[Path]:
        """Finished snapshot folders of every run, in step order (temporary folders of killed writes are ignored)."""
        if not self.directory.is_dir():
            return []
        folders = [p for p in self.directory.iterdir() if is_snapshot_folder(p)]
        return sorted(folders, key=lambda p: snapshot_step(p) or 0)  # every snapshot folder has a step

    def load_newest(self, of_run: str | None = None, *, at_most: int | None = None) -> Snapshot | None:
        """The newest good snapshot. Each bad one is skipped with a `SnapshotCorrupt` naming its file and what is
        wrong; when there were snapshots but none is good, one more says that a resume starts from step 0.

        Args:
            of_run: Load only snapshots written by the run with this id (those of other runs are left alone, with
                one warning); None accepts any. The chosen run's snapshots become this run's own, for retention.
            at_most: Only snapshots of this step or earlier (the newest step every rank of a run holds).
        """
        foreign: list[Path] = []
        mine: list[Path] = []
        folders = [p for p in self.complete() if at_most is None or (snapshot_step(p) or 0) <= at_most]
        self.found = len(folders)
        for folder in folders:
            owner = _run_of(folder)
            (foreign if of_run is not None and owner is not _UNREADABLE and owner != of_run else mine).append(folder)
        if foreign:
            warnings.warn(
                f"{self.directory} holds {len(foreign)} snapshot(s) written by another run (newest: "
                f"{foreign[-1].name}); only this run's own snapshots are loaded, and those are left alone",
                KeelWarning,
                stacklevel=2,
            )
        self._own = [p for p in mine if p not in self._own] + self._own
        for index in reversed(range(len(mine))):
            try:
                snap = self.load(mine[index])
            except SnapshotInvalid as exc:
                warnings.warn(f"skipping snapshot {mine[index]}: {exc}", SnapshotCorrupt, stacklevel=2)
                continue
            self._older = mine[:index]
            return snap
        if mine or foreign:
            warnings.warn(
                f"none of the {len(mine) + len(foreign)} snapshots in {self.directory} is usable (see the "
                "warnings above): a resume starts from step 0",
                SnapshotCorrupt,
                stacklevel=2,
            )
        return None

    def load_older(self, limit: int) -> list[Snapshot]:
        """Up to ``limit`` good snapshots older than the one `load_newest` returned, of the same run, newest first
        (a bad one is skipped with a `SnapshotCorrupt` naming it): a resumed run can roll back as far as the
        uninterrupted one could."""
        found: list[Snapshot] = []
        for folder in reversed(self._older):
            if len(found) >= limit:
                break
            try:
                found.append(self.load(folder))
            except SnapshotInvalid as exc:
                warnings.warn(f"skipping snapshot {folder}: {exc}", SnapshotCorrupt, stacklevel=2)
        return found

    @staticmethod
    def load(folder: str | Path) -> Snapshot:
        """Load the snapshot in ``folder``.

        Raises:
            SnapshotInvalid: It is damaged or not keel's; the message names the file and the reason.
        """
        return read_snapshot(folder)


def remove_snapshot(folder: Path) -> None:
    """Delete a snapshot folder so that a process killed meanwhile leaves no half of it under its name (a
    ``step-<N>`` folder without its ``meta.json`` was warned about as damaged at every resume after): it is renamed
    to a temporary name first, which the next claim of the run_dir deletes as it does a killed write's folder."""
    gone = folder.with_name(f"{PARTIAL_PREFIX}{folder.name.removeprefix('step-')}-{os.getpid()}-gone")
    try:
        os.rename(folder, gone)
    except FileNotFoundError:
        return
    except OSError:  # the temporary name is taken (a folder a killed process of the same id left): delete in place
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)


_UNREADABLE = object()
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full: an OSError, or safetensors' error, which names
    the OS error only in its message."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return any(f"os error {code})" in text or os.strerror(code) in text for code in _FULL)


def _run_of(folder: Path) -> object:
    """The run id in ``folder``'s ``meta.json``: a str, None when it names none (written before runs had ids), or
    ``_UNREADABLE`` (then the load that follows says what is wrong with it)."""
    try:
        return read_meta(folder).get("run_id")
    except SnapshotInvalid:
        return _UNREADABLE
