"""keel's host-side group (the gloo twin it makes for a world of another backend, for its layout checks) waits on a
hung rank exactly as long as the job's own process group does: the timeout given to ``init_process_group``, and the
one a loop sets later (torchtitan's ``set_pg_timeouts`` after the first step) — not gloo's default of 30 minutes,
which made keel's check outlast (or cut short) the wait the user chose.

One process, world size 1, on a ``HashStore``: ``"cpu:gloo"`` is a backend string other than ``"gloo"``, so keel
makes its twin as it does for ``"nccl"`` or ``"cpu:gloo,cuda:nccl"``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from keel.guard import distributed as keel_dist
from keel.store import RunReader
from tests.distributed.launch import ROOT, torchrun

CPU = torch.device("cpu")


def timeout_of(group) -> timedelta:
    return group._get_backend(CPU).options._timeout


@pytest.fixture
def world():
    """A one-process world of backend "cpu:gloo" with a 17 s timeout; destroyed (with keel's twin) afterwards."""
    dist.init_process_group("cpu:gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=17))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        keel_dist._GLOO_WORLDS.clear()


def test_the_twin_of_a_world_of_another_backend_waits_as_long_as_the_world(world):
    twin, device = keel_dist._host_group(None)
    assert twin is not world and device == CPU  # a twin, as for NCCL
    assert timeout_of(twin) == timedelta(seconds=17)  # was 0:30:00, gloo's default


def test_the_twin_follows_a_timeout_the_loop_sets_later(world):
    twin, _ = keel_dist._host_group(None)
    _set_pg_timeout(timedelta(seconds=100), world)  # torchtitan after its first step (train_timeout_seconds)
    keel_dist._follow_timeout(twin, None)
    assert timeout_of(twin) == timedelta(seconds=100)
    assert keel_dist._host_group(None)[0] is twin  # still one twin per world


def test_a_group_without_a_readable_timeout_leaves_the_twin_as_it_is(world):
    twin, _ = keel_dist._host_group(None)

    class Opaque:  # a backend of another vendor: no ``options._timeout`` to read
        _device_types = [CPU]

        def _get_backend(self, device):
            return object()

    keel_dist._follow_timeout(twin, Opaque())
    assert timeout_of(twin) == timedelta(seconds=17)


class Backend:
    """A group's backend as `_timeout_of` reads it: ``options._timeout``, or whatever a vendor's holds."""

    def __init__(self, options):
        self.options = options


class Group:
    """A process group as `_timeout_of` reads it: one backend per device type."""

    def __init__(self, *backends, devices=None):
        self._device_types = devices if devices is not None else [torch.device("cpu", i) for i in range(len(backends))]
        self.backends = dict(zip(self._device_types, backends, strict=False))

    def _get_backend(self, device):
        if device not in self.backends:
            raise RuntimeError(f"no backend for {device}")
        return self.backends[device]


class Options:
    def __init__(self, timeout):
        self._timeout = timeout


class Raising:
    @property
    def _timeout(self):
        raise RuntimeError("not bound for this backend")


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (Group(Backend(Options(timedelta(seconds=5)))), timedelta(seconds=5)),
        (Group(Backend(Options(timedelta(seconds=5))), Backend(Options(timedelta(minutes=9)))), timedelta(minutes=9)),
        (Group(Backend(Options(timedelta(seconds=5))), Backend(Raising())), timedelta(seconds=5)),  # the one it reads
        (Group(Backend(None)), None),  # no options
        (Group(Backend(Options(300))), None),  # not a timedelta: not trusted
        (Group(Backend(Raising())), None),
        (Group(devices=[torch.device("cpu")]), None),  # a device whose backend cannot be had
        (Group(), None),  # no devices
        (object(), None),  # not a process group at all
    ],
)
def test_a_timeout_that_cannot_be_read_is_none_never_an_error(group, expected):
    assert keel_dist._timeout_of(group) == expected


WORKER = Path(__file__).with_name("hung_worker.py")


@pytest.mark.slow  # a torchrun job (~15 s on the 2-core CI machine)
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("late_at", "backend"),
    [(2, "gloo"), (0, "cpu:gloo")],  # a healthy step's one all-reduce; the first step's layout check on the twin
)
def test_after_one_collective_failed_keel_waits_on_no_other(tmp_path, late_at, backend):
    torchrun(WORKER, str(tmp_path), "4", "6", str(late_at), backend)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [component for component, _ in seen["failed"]] == ["guard", "weights check"], seen
        errors = dict(seen["failed"])
        # the weights check of the same step made no collective: it waited a second timeout on the twin's world, or
        # failed on gloo's closed pairs (where another rank could be waiting in it)
        assert errors["weights check"].startswith("RuntimeError: keel's collectives stopped after one failed"), errors
        (warning,) = seen["warnings"]
        assert f"rank {rank}: keel's all_reduce failed after" in warning and "no more collectives" in warning
        if backend == "gloo":  # one group, broken: the loop's own next collective fails, keel does not hide it
            assert seen["loop_error"] and len(seen["step_seconds"]) == late_at + 1, seen
        else:  # only keel's twin broke: the loop trains on, unguarded, keel waiting on nothing
            assert seen["loop_error"] is None and len(seen["step_seconds"]) == 6, seen


@pytest.mark.slow  # a torchrun job (~15 s on the 2-core CI machine)
@pytest.mark.distributed
def test_sigterm_ends_a_rank_waiting_in_keels_collective_and_its_store_says_where(tmp_path):
    """torchrun's SIGTERM (a scheduler's cancel, or torchrun's own when another rank failed) while rank 0 waits in
    keel's all-reduce for a hung rank 1 (process group timeout 10 min): rank 0's handler runs there, the store says
    where the run stopped, and the job ends (as bare DDP's), not at the timeout nor at torchrun's SIGKILL 30 s later."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER)]
    job = subprocess.Popen([*cmd, str(tmp_path), "600", "3600", "2", "gloo"], env=env, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "late").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "late").exists(), job.communicate(timeout=5)[0][-3000:]
        time.sleep(2)  # rank 0 reaches keel's all-reduce of step 2 within milliseconds
        job.send_signal(signal.SIGTERM)
        output = job.communicate(timeout=25)[0]  # torchrun's SIGKILL of a rank that ignored SIGTERM comes at 30 s
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    with RunReader(tmp_path / "run") as store:
        assert store.meta()["status"] == "interrupted by SIGTERM after 2 steps", output[-3000:]
