"""The background snapshot copy on CPU: exact, and it builds no second OpenMP team (issue 13, item 0).

A ``Tensor.copy_`` of a large tensor from the copy thread made libgomp give that thread a team of its own; with
more OpenMP threads than cores every parallel op of the training thread then waited for a sleeping worker, and
``policy="recover"`` cost up to 1.9x a bare step. The copy thread must add itself and nothing else.
"""

import os
import sys
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from keel.recover.snapshot import SERIAL_ELEMENTS, SnapshotRing, _copy_quietly
from keel.recover.state import TrainingState


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64]
)
def test_the_quiet_copy_is_bit_exact_for_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    src = (torch.randn(1000, 70, generator=g) * 100).to(dtype)
    dst = torch.empty_like(src)
    _copy_quietly([dst], [src])
    assert torch.equal(
        dst.view(torch.uint8) if dtype != torch.bool else dst, src.view(torch.uint8) if dtype != torch.bool else src
    )


def test_non_contiguous_scalar_and_empty_sources_are_copied_exactly():
    base = torch.randn(300, 200)
    cases = [base.t(), base[:, ::2], torch.tensor(3.5), torch.zeros(0, 4), torch.randn(5 * SERIAL_ELEMENTS)]
    dsts = [torch.empty(s.shape, dtype=s.dtype) for s in cases]
    _copy_quietly(dsts, cases)
    for d, s in zip(dsts, cases, strict=True):
        assert torch.equal(d, s)


@pytest.fixture
def two_torch_threads():
    """Two intra-op threads for the test (the suite's workers run on one each), the worker's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no parallel region to avoid")
@pytest.mark.usefixtures("two_torch_threads")
def test_a_background_snapshot_adds_one_thread_and_no_openmp_team():
    torch.zeros(1 << 20).add_(1)  # the training thread's own team exists before we count
    model = nn.Linear(1024, 1024)  # 1M-element weight: its copy_ would be a parallel region
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    before = _threads()
    ring = SnapshotRing(capacity=2, background=True)
    snap = ring.take(1, TrainingState(model=model, optimizer=opt))
    ring.fence()
    assert torch.equal(snap.tensors["model/weight"], model.weight)
    assert _threads() == before + 1  # keel-snapshot-copy alone
    assert any(t.name == "keel-snapshot-copy" for t in threading.enumerate())
    ring.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no parallel region to avoid")
@pytest.mark.usefixtures("two_torch_threads")
def test_the_mechanism_a_copy_from_another_thread_builds_a_team():
    # The control for the test above: a plain copy_ from a second thread does add an OpenMP worker, so a count
    # of +1 there means the quiet copy avoided it, not that this machine never builds one.
    torch.zeros(1 << 20).add_(1)
    src, dst = torch.randn(1 << 21), torch.empty(1 << 21)
    copied, release = threading.Event(), threading.Event()

    def copy_then_wait():
        dst.copy_(src)
        copied.set()
        release.wait()

    before = _threads()
    worker = threading.Thread(target=copy_then_wait)
    worker.start()
    copied.wait()
    try:
        assert _threads() >= before + 2  # the thread and its team's worker
    finally:
        release.set()
        worker.join()


def test_without_a_spare_core_the_copy_is_done_in_place_exactly_and_starts_no_thread(monkeypatch):
    import keel.recover.snapshot as snapshot

    monkeypatch.setattr(snapshot, "spare_cores", lambda: False)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    ring = SnapshotRing()
    assert ring.background is False
    snap = ring.take(1, TrainingState(model=model, optimizer=opt))
    assert snap.ready.is_set() and ring._worker is None  # complete when take returns
    assert torch.equal(snap.tensors["model/weight"], model.weight)
    ring.close()


@pytest.mark.parametrize("background", ["yes", 1, 0.0])
def test_background_takes_none_true_or_false(background):
    with pytest.raises(ValueError, match="background="):
        SnapshotRing(background=background)


def test_a_small_state_is_copied_at_once_even_with_a_spare_core():
    """A state under `INLINE_BYTES` (here 33 KiB with AdamW's moments) is copied by the training thread: handing it to
    the copy thread cost more than the copy (~15 µs more per snapshot on a 5-parameter model)."""
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    ring = SnapshotRing(background=True)
    snap = ring.take(1, TrainingState(model=model, optimizer=opt))
    assert snap.ready.is_set() and ring._worker is None  # complete when take returns, no thread started
    assert torch.equal(snap.tensors["model/weight"], model.weight)
    assert torch.equal(snap.tensors["optim/0/exp_avg_sq"], opt.state[model.weight]["exp_avg_sq"])
    ring.close()


class _CountCopies(TorchDispatchMode):
    """Counts the ``aten.copy_`` calls dispatched inside it (a large one is an OpenMP parallel region)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reused", [False, True], ids=["fresh buffers", "ring full: buffers reused"])
def test_an_in_place_snapshot_copies_with_no_parallel_copy_op(reused):
    """Without a spare core the training thread copies the snapshot itself, with ``memmove``: no ``Tensor.copy_``,
    whose large copies are each an OpenMP parallel region. With every core taken (the step's two threads on a 2-core
    VM, and any other load), each region waited for torch's second thread to be scheduled: the small proxy's 18 such
    copies per snapshot took a median 332 ms against 1.6 ms by memmove (`/tmp/h27P/copyab.py small 2 40`, load ~6),
    and `keel bench overhead`'s recover blocks 7-21 ms per snapshot on a quiet machine where others read 1.5 ms."""
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    state = TrainingState(model=model, optimizer=opt)
    ring = SnapshotRing(capacity=1, background=False)
    if reused:
        ring.take(0, state)
    with _CountCopies() as counted:
        snap = ring.take(1, state)
    assert counted.copies == 0
    assert snap.ready.is_set() and ring._worker is None
    for index, (name, p) in enumerate(model.named_parameters()):
        assert torch.equal(snap.tensors[f"model/{name}"], p)
        for key, t in opt.state[p].items():
            assert torch.equal(snap.tensors[f"optim/{index}/{key}"], t)
    ring.close()
