"""In-memory snapshots: a ring of the last K training states, copied in the background.

Parameters and optimizer tensors only change inside ``optimizer.step()``, so a snapshot taken right after
one step can be copied while the next forward and backward run, and only has to be finished (fenced) before
the next ``optimizer.step()`` — the idea of DataStates-LLM (Maurya et al. 2024) and of PyTorch DCP's
asynchronous stager. On CUDA the copy goes to pinned host memory on a side stream; on CPU a worker thread
does it with plain ``memmove`` calls (see `_copy_quietly`). Host buffers are reused from the oldest slot, so a
steady run allocates nothing after the ring fills.

**Why not ``Tensor.copy_`` in the worker.** A large ``copy_`` is an OpenMP parallel region, and a region entered
from a second thread makes libgomp build that thread a team of its own, which lives as long as the thread.
With more OpenMP threads than cores, libgomp stops letting idle workers spin and puts them to sleep after
every region ("throttled" spinning), so from then on each of the *training* thread's parallel ops — hundreds
per step of a small model — waits for a worker to wake: measured, a 200k-element ``add`` went from 17 µs to
29–35 µs for the rest of the run, and ``policy="recover"`` cost 1.36–1.9× a bare step on 2 cores. A
``memmove`` is single-threaded, enters no parallel region and releases the GIL.

**When the background copy pays.** Only with a core to run on: on a CPU whose cores the training step's
threads already take, a copy beside the step slows that step by about the copy's own time, plus the fence
(measured: the 40 MB state of the large proxy cost ~25 ms of step time per snapshot in the background, ~4 ms
copied in place). So by default (``background=None``) the worker thread is used when the process may run on more
cores than ``torch.get_num_threads()``, and the copy is done in place otherwise; on CUDA the side stream is always
used.

**In place, quietly too.** The training thread copies with the same ``memmove`` calls, not with ``Tensor.copy_``:
each large ``copy_`` is a parallel region, and every region waits at its end for torch's other threads, so when
another process holds a core, each of the small proxy's 18 large copies waited for a thread to be scheduled.
Measured on the 2-core VM under other load, right after a training step: 332 ms per snapshot by ``copy_`` against
1.6 ms by ``memmove`` (medians; best cases 0.8 and 1.1 ms), and 253 vs 39 ms for the large proxy's 40 MB. The
recover processes of ``keel bench overhead`` had blocked 7-21 ms per small snapshot in some runs, 1.5 ms in others.

**What is copied.** The parameters the optimizer can change, the buffers and the optimizer state; the parameters it
cannot change (a LoRA fine-tune's frozen base) are recorded, not copied (`keel.recover.fixed`, which says when a
snapshot without them is refused).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from keel.recover.fixed import FixedTensor
from keel.recover.state import StartState, TrainingState, capture_plain, fixed_parameters, tensor_sources

SERIAL_ELEMENTS = 16_384  # below at::internal::GRAIN_SIZE (32,768): ATen's parallel_for runs such a copy serially
# A state smaller than this is copied by the training thread at once: handing it to the copy thread (a queue put, the
# thread woken, the GIL passed back and forth) cost ~15 µs more per snapshot than the memmove of a few hundred KiB
INLINE_BYTES = 256 * 1024


@dataclass
class Snapshot:
    """One captured training state.

    Attributes:
        step: The step this state is the start of (the number of steps done when it was taken).
        tensors: Host copies of parameters, buffers and optimizer tensors, by key.
        skeleton: The optimizer's ``state_dict`` with tensors replaced by their keys in ``tensors``.
        plain: Scheduler, scaler, component and data states, and the RNG states.
        created: Wall-clock time of capture.
        fixed: The parameters left out because training cannot change them (`keel.recover.fixed`), by key.
    """

    step: int
    tensors: dict[str, Tensor]
    skeleton: dict[str, Any]
    plain: dict[str, Any]
    created: float = field(default_factory=time.time)
    fixed: dict[str, FixedTensor] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event, repr=False)
    # held while the disk tier writes it, and for good once its buffers are handed to a newer snapshot
    in_use: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _CopyWorker:
    """One background thread that runs bulk CPU copies in order."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple[list[Tensor], list[Tensor], threading.Event] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="keel-snapshot-copy", daemon=True)
        self._thread.start()

    def submit(self, dsts: list[Tensor], srcs: list[Tensor], done: threading.Event) -> None:
        self._tasks.put((dsts, srcs, done))

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            dsts, srcs, done = task
            try:
                _copy_quietly(dsts, srcs)
            finally:
                done.set()

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join()


def spare_cores() -> bool:
    """Whether the process may run on more cores than torch's intra-op threads take (the CPU copy thread's own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def _copy_quietly(dsts: list[Tensor], srcs: list[Tensor]) -> None:
    """``d.copy_(s)`` for each pair without entering an OpenMP parallel region (see the module docstring).

    Contiguous CPU tensors of one dtype and shape — what `SnapshotRing` allocates for its sources — are copied
    with one ``ctypes.memmove`` each (the GIL released); any other pair in slices along its first dimension
    small enough for ATen to copy serially.
    """
    with torch.no_grad():
        for d, s in zip(dsts, srcs, strict=True):
            if (
                d.device.type == s.device.type == "cpu"
                and d.dtype == s.dtype
                and d.shape == s.shape
                and d.is_contiguous()
                and s.is_contiguous()
            ):
                if s.numel():
                    ctypes.memmove(d.data_ptr(), s.data_ptr(), s.numel() * s.element_size())
            elif s.dim() == 0:
                d.copy_(s)
            else:
                rows = max(1, SERIAL_ELEMENTS // max(1, s[0].numel()))
                for i in range(0, s.shape[0], rows):
                    d[i : i + rows].copy_(s[i : i + rows])


class SnapshotRing:
    """The last ``capacity`` snapshots in host memory, plus up to ``max_pinned`` pinned ones.

    A pinned snapshot stays when the ring moves on: `Recovery` pins the last state from before a warning's
    onset, so that a rollback is still possible when the warning turns critical long after the ring has
    turned over (an entropy collapse can take hundreds of steps).

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> ring = SnapshotRing(capacity=2)
        >>> snap = ring.take(0, TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
        >>> _ = ring.fence()
        >>> torch.equal(snap.tensors["model/weight"], model.weight)
        True
    """

    def __init__(
        self, capacity: int = 3, max_pinned: int = 2, background: bool | None = None, *, copy_fixed: bool = False
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r}; allowed: an int >= 1")
        if not isinstance(max_pinned, int) or max_pinned < 0:
            raise ValueError(f"max_pinned={max_pinned!r}; allowed: an int >= 0")
        if background is not None and not isinstance(background, bool):
            raise ValueError(f"background={background!r}; allowed: None (a spare core decides), True or False")
        if not isinstance(copy_fixed, bool):
            raise ValueError(f"copy_fixed={copy_fixed!r}; allowed: True or False")
        self.copy_fixed = copy_fixed  # copy the parameters training cannot change too (keel.recover.fixed)
        # the state held from the Guard's line (`StartState`: buffers, RNG, data positions): the next `take` holds it
        # instead of the live one, which the first step's forward has moved on
        self.start: StartState | None = None
        self.last_trained: dict[str, int] = {}  # key -> newest snapshot step that found the parameter trained
        self.capacity, self.max_pinned = capacity, max_pinned
        self.background = spare_cores() if background is None else background
        self.snapshots: list[Snapshot] = []  # oldest first
        self.pinned: list[Snapshot] = []  # oldest pin first; may also still be in `snapshots`
        self._pending: Snapshot | None = None
        self._cuda_event: Any = None
        self._worker: _CopyWorker | None = None
        self.blocked_s = 0.0  # training time spent in take() and fence(), summed

    def take(self, step: int, state: TrainingState) -> Snapshot:
        """Start capturing ``state``; returns at once. Call `fence` before the next ``optimizer.step()``."""
        start = time.perf_counter()
        self.fence()
        bulk, buffers, skeleton = tensor_sources(state, copy_fixed=self.copy_fixed)
        first, self.start = self.start, None  # once: the state as it was before the first forward
        if first is not None:
            buffers = {key: first.buffers.get(key, live) for key, live in buffers.items()}
        fixed = {} if self.copy_fixed else fixed_parameters(state)
        for key in bulk:
            if key.startswith("model/"):
                self.last_trained[key] = max(step, self.last_trained.get(key, step))
        tensors, evicted = self._buffers_for({**bulk, **buffers})
        if evicted is not None and evicted.plain.get("averaged"):  # its EMA copies too are free now
            state.spare_averaged = evicted.plain["averaged"]
        with torch.no_grad():
            for key, src in buffers.items():  # buffers may change in the next forward: copy now
                tensors[key].copy_(src)
        plain = capture_plain(state)
        if first is not None:
            plain["rng"] = first.rng
            plain["tracked"] = {**plain["tracked"], **{k: v for k, v in first.tracked.items() if k in plain["tracked"]}}
        snap = Snapshot(step=step, tensors=tensors, skeleton=skeleton, plain=plain, fixed=fixed)
        dsts, srcs = [tensors[k] for k in bulk], list(bulk.values())
        if any(s.is_cuda for s in srcs):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for d, s in zip(dsts, srcs, strict=True):
                    d.copy_(s, non_blocking=True)
            self._cuda_event = torch.cuda.Event()
            self._cuda_event.record(stream)
        elif self.background and sum(s.numel() * s.element_size() for s in srcs) >= INLINE_BYTES:
            if self._worker is None:
                self._worker = _CopyWorker()
            self._worker.submit(dsts, srcs, snap.ready)
        else:  # no spare core (a copy beside the step would only slow it), or a few KiB: copied now, quietly too
            _copy_quietly(dsts, srcs)
            snap.ready.set()
        self._pending = snap
        self.snapshots.append(snap)
        if len(self.snapshots) > self.capacity:
            self.snapshots.pop(0)
        self.blocked_s += time.perf_counter() - start
        return snap

    def fence(self) -> float:
        """Wait until the snapshot in flight is complete; returns the seconds spent waiting."""
        if self._pending is None:
            return 0.0
        start = time.perf_counter()
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
            self._cuda_event = None
            self._pending.ready.set()
        self._pending.ready.wait()
        self._pending = None
        waited = time.perf_counter() - start
        self.blocked_s += waited
        return waited

    def newest_before(self, step: int) -> Snapshot | None:
        """The newest snapshot, ring or pinned, of a state from before ``step`` (``snapshot.step <= step``)."""
        candidates = self.before(step)
        return candidates[0] if candidates else None

    def before(self, step: int) -> list[Snapshot]:
        """The snapshots, ring and pinned, of states from before ``step``, newest first."""
        self.fence()
        unique = {id(s): s for s in (*self.snapshots, *self.pinned) if s.step <= step}
        return sorted(unique.values(), key=lambda s: s.step, reverse=True)

    def add_older(self, snapshot: Snapshot) -> None:
        """Put a snapshot older than every one in the ring (read back from disk on resume) at its old end, if there
        is room."""
        if len(self.snapshots) < self.capacity and all(snapshot.step < s.step for s in self.snapshots):
            self.snapshots.insert(0, snapshot)

    def pin(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` when the ring moves on; beyond ``max_pinned`` pins the oldest pin is released."""
        if self.max_pinned == 0 or any(p is snapshot for p in self.pinned):
            return
        self.pinned.append(snapshot)
        if len(self.pinned) > self.max_pinned:
            self.pinned.pop(0)

    def drop_after(self, step: int) -> None:
        """Forget snapshots newer than ``step`` (after rolling back to it they describe a discarded past)."""
        self.snapshots = [s for s in self.snapshots if s.step <= step]
        self.pinned = [s for s in self.pinned if s.step <= step]

    def close(self) -> None:
        self.fence()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _buffers_for(self, sources: dict[str, Tensor]) -> tuple[dict[str, Tensor], Snapshot | None]:
        """Host tensors shaped like ``sources``: the oldest slot's when it is about to be evicted and matches; and
        that oldest snapshot when it is evicted for good (its host tensors free for reuse), else None."""
        evicted = None
        if len(self.snapshots) >= self.capacity and not any(p is self.snapshots[0] for p in self.pinned):
            oldest = self.snapshots[0]
            # Not being written to disk right now; kept locked for good, as it is about to be evicted.
            if oldest.in_use.acquire(blocking=False):
                evicted = oldest
                old = oldest.tensors
                if old.keys() == sources.keys() and all(
                    old[k].shape == s.shape and old[k].dtype == s.dtype for k, s in sources.items()
                ):
                    return dict(old), evicted
        pin = torch.cuda.is_available() and any(s.is_cuda for s in sources.values())
        fresh = {k: torch.empty(s.shape, dtype=s.dtype, device="cpu", pin_memory=pin) for k, s in sources.items()}
        return fresh, evicted
