"""keel's host-side group (the gloo twin it makes for a world of another backend, for its layout checks) waits on a
hung rank exactly as long as the job's own process group does: the timeout given to ``init_process_group``, and the
one a loop sets later (torchtitan's ``set_pg_timeouts`` after the first step) — not gloo's default of 30 minutes,
which made keel's check outlast (or cut short) the wait the user chose.

One process, world size 1, on a ``HashStore``: ``"cpu:gloo"`` is a backend string other than ``"gloo"``, so keel
makes its twin as it does for ``"nccl"`` or ``"cpu:gloo,cuda:nccl"``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from keel.guard import distributed as keel_dist
from tests.distributed.launch import torchrun

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
