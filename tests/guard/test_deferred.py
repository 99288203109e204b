"""``Guard(sync="deferred")``: the same training as ``sync="step"``, with no host read before the update.

The sync-free path (issue 13, item 1) must skip exactly the updates the host path skips, at the same steps —
checked parameter by parameter after every step on generated runs — and read nothing of the device's to the
host on a healthy step: every ``tolist``/``item``/``float``/``bool`` of a tensor inside `Guard.step` is counted,
except the reads of the previous step's landed copy.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import Guard, RecoveryConfig
from keel.signals import HostCopy
from tests.conftest import TinyNet, make_batches

STEPS = 45


def _train(sync, policy="skip", events=None, fused=True, scheduler=True, nan_param_at=None, **kwargs):
    """Per step: the parameters after it, the learning rate it used, and the Guard's decisions."""
    events = events or {}
    torch.manual_seed(0)
    model = TinyNet()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        if fused is not None
        else torch.optim.AdamW(model.parameters(), lr=1e-2)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s)) if scheduler else None
    guard = Guard(model, opt, sched, policy=policy, sync=sync, **kwargs)
    params, lrs = [], []
    for step, (x, y) in enumerate(make_batches(STEPS)):
        if step == nan_param_at:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")
        loss = F.mse_loss(model(x), y) * events.get(step, 1.0)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        guard.step(loss)
        opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
    guard.close()
    lrs.append(opt.param_groups[0]["lr"])  # after close: the last step landed
    return params, lrs, guard


EVENTS = st.dictionaries(
    st.integers(0, STEPS - 1), st.sampled_from([math.nan, math.inf, 30.0, 100.0, 3.0, 1.5, 0.2, 1e6]), max_size=6
)


@settings(max_examples=12, deadline=None)
@given(events=EVENTS)
def test_deferred_skips_exactly_the_updates_the_host_path_skips_step_by_step(events):
    host_params, host_lrs, host = _train("step", events=events)
    dev_params, dev_lrs, dev = _train("deferred", events=events)
    for step, (a, b) in enumerate(zip(host_params, dev_params, strict=True)):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), f"parameters differ after step {step}"
    # the scheduler stepped for the same steps; read between two calls it is one step behind (documented)
    assert host_lrs[-1] == dev_lrs[-1] and host_lrs[:-1][:-1] == dev_lrs[1:-1]
    assert [(d.step, d.action) for d in host.decisions] == [(d.step, d.action) for d in dev.decisions]
    assert [(f.step, f.kind, f.severity) for f in host.findings] == [(f.step, f.kind, f.severity) for f in dev.findings]


def test_a_nan_and_a_spike_are_skipped_on_the_device_at_their_own_step():
    _, _, guard = _train("deferred", events={7: math.nan, 30: 100.0})
    assert [(d.step, d.action) for d in guard.decisions] == [(7, "skip"), (30, "skip")]


def test_observe_deferred_is_bit_identical_to_the_bare_loop_with_any_optimizer():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s))
    for x, y in make_batches(STEPS):
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    bare = [p.detach().clone() for p in model.parameters()]
    params, _, guard = _train("deferred", policy="observe", fused=None)
    assert all(torch.equal(p, q) for p, q in zip(params[-1], bare, strict=True))
    assert guard.global_step == STEPS and guard.decisions == []


class HostReads:
    """Counts reads of tensor values to the host (each a sync on a GPU), except inside `HostCopy.land`."""

    METHODS = ("tolist", "item", "__float__", "__bool__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count, self._landing = 0, False
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))
        land = HostCopy.land

        def landing(copy):
            self._landing = True
            try:
                return land(copy)
            finally:
                self._landing = False

        monkeypatch.setattr(HostCopy, "land", landing)

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            if not self._landing:
                self.count += 1
            return original(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("policy", ["observe", "skip", "recover"])
def test_a_healthy_deferred_step_reads_nothing_to_the_host(policy, monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    per_step = {}
    for sync in ("step", "deferred"):
        guard = Guard(
            model,
            opt,
            policy=policy,
            sync=sync,
            max_grad_norm=0.5,
            recovery=RecoveryConfig(snapshot_every=1000) if policy == "recover" else None,
        )
        reads = HostReads(monkeypatch)
        counts = []
        for x, y in make_batches(12):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            before = reads.count
            guard.step(loss)
            counts.append(reads.count - before)
            opt.zero_grad()
        monkeypatch.undo()
        guard.close()
        per_step[sync] = counts
    assert per_step["deferred"] == [0] * 12
    assert min(per_step["step"]) >= 1  # the control: the host path does read each step


def test_a_rollback_is_carried_out_one_step_later_from_the_same_snapshot(tmp_path):
    recovery = RecoveryConfig(snapshot_every=5, quiet_steps=1)
    _, _, host = _train("step", policy="recover", nan_param_at=20, recovery=recovery)
    params, _, dev = _train("deferred", policy="recover", nan_param_at=20, recovery=recovery)
    host_rollbacks = [(d.step, d.restored_step) for d in host.decisions if d.action == "rollback"]
    dev_rollbacks = [(d.step, d.restored_step) for d in dev.decisions if d.action == "rollback"]
    assert host_rollbacks and dev_rollbacks[0] == host_rollbacks[0]  # decided on the same step, same snapshot
    assert dev_rollbacks[0][1] < 20  # from before the NaN
    assert all(torch.isfinite(p).all() for p in params[-1])


def test_deferred_refuses_what_it_cannot_do_with_one_clear_error():
    model = TinyNet()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"fused=True"):
        Guard(model, plain, policy="skip", sync="deferred")
    with pytest.raises(ValueError, match=r"sync='later'; allowed: 'step'"):
        Guard(model, plain, sync="later")
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match=r"GradScaler: not supported yet"):
        Guard(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
            policy="skip",
            scaler=scaler,
            sync="deferred",
        )
    with pytest.raises(ValueError, match=r"has neither"):
        Guard(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
            policy="skip",
            probes=["param_norm"],
            sync="deferred",
        )
