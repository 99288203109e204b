"""A model EMA the loop keeps beside the model (timm's train.py: ``ModelEmaV3(model)``, updated after each
``optimizer.step()``; ``torch.optim.swa_utils.AveragedModel``), registered with ``guard.track(ema)``: a rollback
restores it with the model, a resume restores it exactly. Before, a rollback left the EMA holding the damaged
trajectory (found on timm's train.py under keel.watch in session 11), and ``track`` restored it only on resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import keel
from tests.conftest import make_batches

DECAY = 0.9
CORRUPT_AFTER = 5  # the iteration after whose update a weight is set to Inf (then blended into the EMA)


class TimmShapedEma(nn.Module):
    """timm's ModelEmaV3 as train.py uses it: a deep copy of the model, lerped towards it after each update."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            ema.lerp_(live, 1.0 - self.decay) if ema.is_floating_point() else ema.copy_(live)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _ema(kind: str, model: nn.Module) -> tuple[nn.Module, callable]:
    if kind == "timm":
        ema = TimmShapedEma(model, DECAY)
        return ema, ema.update
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    return ema, ema.update_parameters


def _weights(ema: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ema.state_dict().items()}


@pytest.mark.parametrize("kind", ["timm", "swa_utils"])
def test_a_rollback_restores_the_ema_to_the_average_of_the_restored_update(kind):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema, update_ema = _ema(kind, model)
    guard = keel.watch(model, opt, policy="recover", recovery=keel.RecoveryConfig(snapshot_every=2))
    guard.track(ema, name="ema")
    after = {}  # iteration -> the EMA at its end (after the loop's update of it)
    restored = None
    for i, (x, y) in enumerate(make_batches(9)):
        F.mse_loss(model(x), y).backward()
        opt.step()
        rollback = next((d for d in guard.decisions if d.action == "rollback"), None)
        if rollback is not None and restored is None:
            restored = (rollback.restored_step, _weights(ema))  # before the loop's update of this iteration
        if i == CORRUPT_AFTER:
            with torch.no_grad():
                model[0].weight[0, 0] = math.inf  # damage the update made: the EMA takes it in below
        update_ema(model)
        opt.zero_grad()
        after[i] = _weights(ema)
    guard.close()
    assert restored is not None
    step, weights = restored
    assert 0 < step <= CORRUPT_AFTER
    for key, value in weights.items():  # the EMA as it was at the end of the iteration before the restored step
        assert torch.equal(value, after[step - 1][key]), key
    assert all(torch.isfinite(v).all() for v in after[8].values() if v.is_floating_point())


def test_a_resumed_run_continues_the_ema_exactly(tmp_path):
    def run(steps: int, *, resume: bool, stop: int | None = None, track: bool = True) -> dict[str, torch.Tensor]:
        model = _net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ema, update_ema = _ema("timm", model)
        config = keel.RecoveryConfig(snapshot_every=3, disk_every=1)
        guard = keel.watch(model, opt, policy="recover", run_dir=tmp_path / "run", recovery=config, resume=resume)
        if track:
            guard.track(ema, name="ema")
        batches = make_batches(steps)
        for x, y in batches[guard.global_step : stop]:
            F.mse_loss(model(x), y).backward()
            opt.step()
            update_ema(model)
            opt.zero_grad()
        guard.close()
        return _weights(ema)

    whole = run(10, resume=False)
    (tmp_path / "run").rename(tmp_path / "whole")
    run(10, resume=False, stop=7)  # killed after 7 updates (its last disk snapshot: step 6)
    resumed = run(10, resume=True)
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    (tmp_path / "run").rename(tmp_path / "resumed")
    run(10, resume=False, stop=7)
    with pytest.warns(keel.KeelWarning, match=r"holds the model average 'ema'.*guard.track\(ema, name='ema'\)"):
        run(10, resume=True, track=False)


def test_an_ema_registered_after_the_first_step_is_refused_with_what_a_rollback_would_miss():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = keel.Guard(model, opt, policy="recover")
    x, y = make_batches(1)[0]
    loss = F.mse_loss(model(x), y)
    loss.backward()
    guard.step(loss)
    with pytest.raises(ValueError, match=r"track\('ema'\) after 1 step\(s\).*lack the model average"):
        guard.track(_ema("timm", model)[0], name="ema")
    guard.close()


def test_the_ema_copies_of_an_evicted_snapshot_are_reused_and_the_kept_snapshots_keep_their_own():
    """A snapshot's EMA copies are written into the host tensors of the snapshot the ring evicted (a fresh host tensor
    per EMA tensor per snapshot cost more than the copy: page faults), and no snapshot still kept shares them."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema, update_ema = _ema("timm", model)
    guard = keel.watch(model, opt, policy="recover", recovery=keel.RecoveryConfig(snapshot_every=1, keep_in_memory=2))
    guard.track(ema, name="ema")
    ring = guard.recovery.ring
    ema_after: dict[int, dict[str, torch.Tensor]] = {}
    pointers: set[int] = set()
    for i, (x, y) in enumerate(make_batches(8)):
        F.mse_loss(model(x), y).backward()
        opt.step()
        update_ema(model)
        opt.zero_grad()
        ema_after[i] = _weights(ema)
        for snap in ring.snapshots:
            pointers |= {t.data_ptr() for t in snap.plain.get("averaged", {}).get("ema", {}).values()}
    guard.close()
    kept = [s for s in ring.snapshots if "averaged" in s.plain]
    assert len(kept) == 2
    for snap in kept:  # the snapshot of step s holds the EMA as the loop left it after update s - 1
        for key, value in snap.plain["averaged"]["ema"].items():
            assert torch.equal(value, ema_after[snap.step - 1][key]), (snap.step, key)
    ptrs = [{t.data_ptr() for t in s.plain["averaged"]["ema"].values() if t.numel()} for s in kept]
    assert not ptrs[0] & ptrs[1]
    n_tensors = sum(1 for t in ema.state_dict().values() if t.numel())
    assert len(pointers) <= 3 * n_tensors  # three sets of host tensors at most (before: a fresh set per snapshot)
