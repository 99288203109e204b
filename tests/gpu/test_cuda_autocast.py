"""CUDA twins of the autocast tests: keel on ``cuda`` under bf16 autocast, and fp16 autocast with a
``torch.amp.GradScaler("cuda")``.

The checks are the CPU ones (`tests/integrations/test_autocast.py`, `tests/optim/test_optim_autocast.py`) run on the
device, plus what only a GPU has: the probes read on device and reach the host in ONE device→host copy per step
(counted with ``torch.cuda.set_sync_debug_mode``, against the bare loop's own syncs), and a snapshot copied on a
side stream into pinned host memory restores bit for bit. Marked ``gpu`` (deselected by default); every test skips
without CUDA; each takes seconds. Run: ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from keel.guard import Guard
from keel.proxy import create_proxy_model
from keel.recover import SnapshotRing, TrainingState
from keel.recover.state import restore
from tests.integrations.autocast_run import PROBE_SETS, batches, every_step, optimizer_tensors, params
from tests.integrations.test_autocast import (
    SETS,
    check_collapse_is_judged_in_the_working_precision,
    check_nan_is_skipped_and_traced,
    check_observe_is_bit_identical,
    check_rollback_restores_the_snapshot_exactly,
    check_scaler_overflows_are_its_own_skips,
    check_signals_agree_with_float32,
)
from tests.optim.test_optim_autocast import (
    AUTOCAST,
    CASES,
    check_step_inside_autocast_equals_step_outside,
    check_training_lands_near_float32,
)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
SYNC = "called a synchronizing CUDA operation"  # c10's warning under set_sync_debug_mode("warn")


@pytest.fixture(autouse=True)
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Bit-identity between two runs needs run-to-run identical kernels (warns where an op has none)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


# --- the CPU checks, on the device --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("probes", SETS)
def test_every_signal_under_cuda_autocast_is_finite_and_agrees_with_float32(probes: str, dtype: torch.dtype) -> None:
    check_signals_agree_with_float32(probes, dtype, DEVICE)


@pytest.mark.parametrize("probes", SETS)
@pytest.mark.usefixtures("deterministic")
def test_observe_under_cuda_bf16_autocast_is_bit_identical_to_the_bare_loop(probes: str) -> None:
    check_observe_is_bit_identical(None, torch.bfloat16, DEVICE)  # the device itself repeats a run exactly
    check_observe_is_bit_identical(probes, torch.bfloat16, DEVICE)


@pytest.mark.parametrize("probes", ["default", "full"])
@pytest.mark.usefixtures("deterministic")
def test_observe_under_cuda_fp16_autocast_with_a_grad_scaler_is_bit_identical_to_the_bare_loop(probes: str) -> None:
    check_observe_is_bit_identical(probes, torch.float16, DEVICE, init_scale=2.0**24)


@pytest.mark.usefixtures("deterministic")
def test_a_nan_born_under_cuda_bf16_autocast_is_skipped_and_traced_to_its_block() -> None:
    check_nan_is_skipped_and_traced(torch.bfloat16, DEVICE)


def test_a_rollback_under_cuda_bf16_autocast_restores_the_pinned_snapshot_exactly() -> None:
    run = check_rollback_restores_the_snapshot_exactly(torch.bfloat16, DEVICE)
    snapshots = run.guard.recovery.ring.snapshots
    assert snapshots and all(t.is_pinned() for s in snapshots for t in s.tensors.values())


def test_cuda_fp16_autocast_grad_scaler_overflows_are_the_scalers_skips_not_keels() -> None:
    check_scaler_overflows_are_its_own_skips(DEVICE)


@pytest.mark.parametrize("precision", [None, "bfloat16", "float32"])
def test_output_logits_under_cuda_autocast_judge_collapse_in_the_working_precision(precision: str | None) -> None:
    # CUDA's autocast sums in float32 (it does not on CPU): an explicit bfloat16 must still be judged in bf16
    check_collapse_is_judged_in_the_working_precision(DEVICE, precision)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_cuda_optimizer_step_inside_autocast_equals_the_same_step_outside(
    name: str, foreach: bool | None, dtype: torch.dtype
) -> None:
    check_step_inside_autocast_equals_step_outside(name, foreach, dtype, DEVICE)  # foreach=None: foreach on CUDA


@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_cuda_optimizer_from_bf16_autocast_gradients_lands_near_float32(name: str, foreach: bool | None) -> None:
    check_training_lands_near_float32(name, foreach, DEVICE, autocast=torch.bfloat16)


@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_cuda_optimizer_with_bf16_parameters_lands_near_float32(name: str, foreach: bool | None) -> None:
    check_training_lands_near_float32(name, foreach, DEVICE, params=torch.bfloat16)


# --- one device→host copy per step --------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_syncs() -> Iterator[list[warnings.WarningMessage]]:
    """Every synchronizing CUDA call in the block, as the warnings ``set_sync_debug_mode("warn")`` raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _syncs_per_step(probes: str | None, dtype: torch.dtype, init_scale: float | None, steps: int = 6) -> list[int]:
    """Syncs of each whole step (forward with the hooks, backward, guard.step or the bare optimizer step)."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # foreach on CUDA, its step counts on the CPU
    scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale) if init_scale else None
    guard = (
        Guard(model, optimizer, scaler=scaler, log_every=1, probes=every_step(PROBE_SETS[probes]))
        if probes is not None
        else None
    )
    counts = []
    for batch in batches(steps, DEVICE):
        with counting_syncs() as caught:
            with torch.autocast(DEVICE, dtype=dtype):
                loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if guard is not None:
                guard.step(loss)
            elif scaler is not None:
                scaler.step(optimizer)  # its own found_inf read: a sync the guarded loop has too
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts.append(sum(SYNC in str(w.message) for w in caught))
    if guard is not None:
        guard.close()
    return counts


@pytest.mark.parametrize(("dtype", "init_scale"), [(torch.bfloat16, None), (torch.float16, 2.0**16)], ids=str)
@pytest.mark.parametrize("probes", SETS)
def test_every_probe_set_reaches_the_host_in_one_copy_per_step(
    probes: str, dtype: torch.dtype, init_scale: float | None
) -> None:
    """Every probe measuring at every step; from step 1 on (step 0 settles, once, that the head feeds a softmax:
    one host read) the guarded step syncs exactly once more than the bare one: the packed signals' copy."""
    bare = _syncs_per_step(None, dtype, init_scale)
    guarded = _syncs_per_step(probes, dtype, init_scale)
    assert [g - b for g, b in zip(guarded[1:], bare[1:], strict=True)] == [1] * (len(bare) - 1), (bare, guarded)


# --- snapshots into pinned host memory ----------------------------------------------------------------------------
def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, fence=None) -> None:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    if fence is not None:
        fence()  # as the guard does: the copy must be complete before the step changes the tensors
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.usefixtures("deterministic")
def test_snapshot_take_and_fence_on_cuda_restore_bit_for_bit() -> None:
    """take() copies on a side stream while the next forward and backward run; fence() before the step. The host
    copies are pinned, equal the state at take() bit for bit, and a restore continues exactly as the original."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(6, DEVICE)
    for batch in data[:3]:
        _train_step(model, optimizer, batch)
    state = TrainingState(model=model, optimizer=optimizer)
    at_take, optim_at_take = params(model), optimizer_tensors(optimizer)
    # a twin that goes on from here untouched; one deepcopy, so the twin optimizer holds the twin's parameters
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    ring = SnapshotRing(capacity=2)
    snapshot = ring.take(3, state)
    _train_step(model, optimizer, data[3], fence=ring.fence)
    _train_step(model, optimizer, data[4])
    assert all(t.is_pinned() for t in snapshot.tensors.values())
    assert all(torch.equal(snapshot.tensors[f"model/{k}"], v) for k, v in at_take.items())
    restore(state, snapshot.tensors, snapshot.skeleton, snapshot.plain, resume=False)
    assert all(torch.equal(v, at_take[k]) for k, v in params(model).items())
    restored = optimizer_tensors(optimizer)
    assert restored.keys() == optim_at_take.keys()
    assert all(torch.equal(restored[k], optim_at_take[k]) for k in restored)
    _train_step(model, optimizer, data[5])
    _train_step(twin_model, twin_optimizer, data[5])
    ring.close()
    twin = params(twin_model)
    assert all(torch.equal(v, twin[k]) for k, v in params(model).items())
