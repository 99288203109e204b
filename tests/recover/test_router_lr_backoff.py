"""A rollback for a router alone backs off the router's param groups only (E2 residual, session 14).

Outside-in: a tiny Hugging Face Mixtral with its router weights in their own AdamW group at 100× the LR locks its
router (load_collapse critical); `policy="recover"` then cut the whole model's LR, twice, and the loss ended at 3.83
where the run left alone ended at 2.38 (/work/notes/h26-D-figures.md). The router's own groups take the cut now;
a router sharing its group with other parameters still gets the whole model's cut (a whole-model LR too high locks
routers too, and that cut mends it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel import Guard, RecoveryConfig
from keel._core import keys
from keel._core.finding import Finding
from keel.recover import DiskSnapshots, SnapshotRing, TrainingState, restore
from keel.recover.actions import (
    ActionState,
    apply_actions,
    choose_actions,
    group_lr_scales,
    router_caused,
    router_param_groups,
)
from tests.conftest import make_batches


class TinyMoE(nn.Module):
    """One MoE block by keel's layout rule: a ``gate`` (E=4) beside ``experts``; soft mixture of 4 experts."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.gate = nn.Linear(4, 4, bias=False)
        self.block.experts = nn.ModuleList(nn.Linear(4, 2) for _ in range(4))
        self.block.top_k = 4
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        probs = self.block.gate(x).softmax(-1)
        outs = torch.stack([e(x) for e in self.block.experts], dim=-1)
        return (outs * probs.unsqueeze(1)).sum(-1)


def _finding(kind: str, severity: str = "critical", step: int = 5) -> Finding:
    return Finding(step=step, kind=kind, severity=severity, signal=keys.MOE_LOAD_IMBALANCE, value=2.0, baseline=1.0)


def _optimizer(model: TinyMoE, *, own_group: bool, router_lr: float = 1.0) -> torch.optim.Optimizer:
    router = list(model.block.gate.parameters())
    rest = [p for p in model.parameters() if all(p is not r for r in router)]
    if not own_group:
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return torch.optim.AdamW([{"params": rest, "lr": 1e-2}, {"params": router, "lr": router_lr}])


def test_the_router_param_groups_are_those_holding_router_parameters_only():
    torch.manual_seed(0)
    model = TinyMoE()
    assert router_param_groups(model, _optimizer(model, own_group=True)) == (1,)
    assert router_param_groups(model, _optimizer(model, own_group=False)) == ()  # shared with the rest


def _two_groups(router_lr: float) -> torch.optim.Optimizer:
    rest, router = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    return torch.optim.SGD([{"params": [rest], "lr": 1e-3}, {"params": [router], "lr": router_lr}])


def _backoff(state: ActionState, opt: torch.optim.Optimizer, findings: tuple[Finding, ...], groups=(1,)) -> list[str]:
    return apply_actions(
        ["lr_backoff"], state, opt, step=7, lr_backoff=0.1, cooldown_steps=None, findings=findings,
        router_groups=groups,
    )  # fmt: skip


ROUTER_ALONE = (_finding("load_collapse"), _finding("router_logit_growth", "warning"))


def test_a_router_finding_alone_cuts_the_router_group_down_to_the_rest_then_the_whole_model():
    assert router_caused(ROUTER_ALONE) and choose_actions(ROUTER_ALONE, 1) == ["lr_backoff"]
    state, opt = ActionState(), _two_groups(router_lr=1e-1)  # the router at 100× the rest
    assert "router LR (param group 1: × 0.01)" in _backoff(state, opt, ROUTER_ALONE)[0]  # in line with the rest
    assert state.lr_scale == 1.0 and group_lr_scales(state, 8, None, 2) == [1.0, pytest.approx(0.01)]
    _backoff(state, opt, ROUTER_ALONE)  # in line with the rest and in trouble again: the whole model's LR
    assert state.lr_scale == pytest.approx(0.1) and group_lr_scales(state, 8, None, 2) == pytest.approx([0.1, 1e-3])
    again = ActionState()
    again.load_state_dict(state.state_dict())
    assert again == state
    legacy = ActionState()  # a snapshot written before router groups had their own scale
    legacy.load_state_dict({"lr_scale": 0.1, "lr_scale_since": 3, "max_grad_norm": None})
    assert legacy.group_lr_scale == {} and group_lr_scales(legacy, 4, None, 2) == [0.1, 0.1]


def test_a_router_group_a_little_above_the_rest_is_cut_by_the_usual_back_off():
    state = ActionState()
    _backoff(state, _two_groups(router_lr=3e-3), ROUTER_ALONE)
    assert state.group_lr_scale == {1: pytest.approx(0.1)} and state.lr_scale == 1.0


@pytest.mark.parametrize(
    ("findings", "router_lr", "groups"),
    [
        ((_finding("load_collapse"), _finding("divergence")), 1e-1, (1,)),  # not the router's alone
        (ROUTER_ALONE, 1e-3, (1,)),  # the router's LR is the rest's: the whole model's LR is the suspect
        (ROUTER_ALONE, 1e-1, ()),  # the router shares its group
    ],
)
def test_otherwise_the_back_off_is_the_whole_models(findings, router_lr, groups):
    state = ActionState()
    assert _backoff(state, _two_groups(router_lr), findings, groups) == ["LR × 0.1 from now on"]
    assert state.lr_scale == pytest.approx(0.1) and state.group_lr_scale == {}


class RouterLockedAt:
    """A critical load_collapse at one step (what the detector says of a locked-in router)."""

    name = "router_locked"
    reads = (keys.LOSS,)

    def __init__(self, step: int) -> None:
        self.step = step

    def update(self, obs):
        return [_finding("load_collapse", step=obs.step)] if obs.step == self.step else []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _lrs_after_rollback(own_group: bool) -> list[float]:
    torch.manual_seed(0)
    model = TinyMoE()
    opt = _optimizer(model, own_group=own_group)
    seen: list[list[float]] = []
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
    try:
        with Guard(
            model, opt, policy="recover", detectors=[RouterLockedAt(12)],
            recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1),
        ) as guard:  # fmt: skip
            for x, y in make_batches(16, batch=8):
                loss = F.mse_loss(model(x[:, :4]), y[:, :2])
                loss.backward()
                guard.step(loss)
                opt.zero_grad()
    finally:
        handle.remove()
    assert [d.action for d in guard.decisions if d.action != "ok"] == ["rollback"]
    return seen[-1]


def test_under_recover_the_rollback_for_a_locked_router_cuts_only_the_routers_group():
    assert _lrs_after_rollback(own_group=True) == [pytest.approx(1e-2), pytest.approx(1e-2)]  # router 1.0 × 0.01


def test_under_recover_a_router_sharing_its_group_gets_the_whole_models_cut():
    assert _lrs_after_rollback(own_group=False) == [pytest.approx(1e-3)]


def test_a_router_groups_cut_survives_a_disk_snapshot_and_a_resume(tmp_path):
    def state() -> TrainingState:
        torch.manual_seed(0)
        model = TinyMoE()
        training = TrainingState(model=model, optimizer=_optimizer(model, own_group=True))
        training.history["actions"] = ActionState()
        return training

    saved = state()
    saved.history["actions"].group_lr_scale = {1: 0.01}
    ring = SnapshotRing()
    snap = ring.take(8, saved)
    ring.fence()
    DiskSnapshots(tmp_path).save(snap)
    fresh = state()
    loaded = DiskSnapshots(tmp_path).load_newest()
    restore(fresh, loaded.tensors, loaded.skeleton, loaded.plain, resume=True)
    assert fresh.history["actions"].group_lr_scale == {1: 0.01}
