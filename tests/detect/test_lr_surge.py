"""LR surge: one update at 100x the learning rate is critical at that very step and skipped before it is applied;
warm-ups, schedule restarts, decays and a deliberate raise stay quiet (or cost one skipped update, once).

Outside-in: the fault is the one session 14 measured in three public loop shapes (nanochat's Muon + AdamW loop,
minGPT's Trainer.run, litgpt's warm-up + cosine ``lr`` written into every group each step), where keel named it
late (a loss z of 9 under the critical 12; a divergence warning 14 steps on) or not at all. The healthy schedules
are torch's own schedulers (and HF's linear warm-up from 0) stepping a real optimizer, read as the Guard reads them.
"""

import functools
import math

import pytest
import torch
from torch import nn

import keel
from keel._core import Observation, keys
from keel.detect import default_detectors
from keel.detect.lr_surge import LrSurgeConfig, LrSurgeDetector
from keel.guard import Guard

STEPS = 120


def litgpt_lrs(steps=40, peak=3e-3, floor=3e-4, warmup=5):
    """litgpt's pretraining schedule as its loop writes it into every group: linear warm-up, then cosine."""
    return [
        peak * (s + 1) / warmup
        if s < warmup
        else floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        for s in range(steps)
    ]


def observations(lrs, *, every=1, groups=None):
    """The Guard's values: ``lr`` (group 0) and ``lr/<i>`` where group i's differs."""
    out = []
    for i, lr in enumerate(lrs):
        values = {keys.LOSS: 2.0, keys.LR: float(lr)}
        for g, group_lrs in (groups or {}).items():
            if group_lrs[i] != lr:
                values[f"{keys.LR}/{g}"] = float(group_lrs[i])
        out.append(Observation(step=i * every, values=values))
    return out


def feed(det, obs):
    return [f for o in obs for f in det.update(o)]


def scheduled(make, steps=STEPS, lr=0.1):
    """The learning rates a torch scheduler gives an optimizer over ``steps`` updates."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_one_update_at_100x_in_litgpts_schedule_is_critical_at_that_step_alone():
    lrs = litgpt_lrs()
    lrs[20] *= 100  # helper G's litgpt case: the loss then sat 1.27x its level for 12+ steps, and keel said nothing
    found = feed(LrSurgeDetector(), observations(lrs))
    assert [(f.step, f.kind, f.severity, f.signal) for f in found] == [(20, "lr_surge", "critical", keys.LR)]
    assert found[0].evidence["ratio"] == pytest.approx(lrs[20] / 3e-3)
    assert "skip the update" in found[0].advice


def lr_lambda_schedules():
    def wsd(s):  # warm-up 10, stable, decay to 0 over the last 30 (MiniCPM's warmup-stable-decay)
        return min((s + 1) / 10, 1.0, max(0.0, (STEPS - s) / 30))

    def hf_linear_warmup(s):  # transformers.get_linear_schedule_with_warmup: 0 at step 0
        return s / 10 if s < 10 else max(0.0, (STEPS - s) / (STEPS - 10))

    return {"wsd": wsd, "hf_linear_warmup_from_0": hf_linear_warmup}


HEALTHY = {
    "linear_warmup_from_1e-3": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-3, total_iters=10),
    "linear_warmup_from_1e-8": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-8, total_iters=3),
    "cosine_warm_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=40, eta_min=0.0),
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=STEPS),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-4, max_lr=0.1, step_size_up=15),
    # torch's SequentialLR example (and He et al. 2016's ResNet-110 warm-up): 0.1x for 2 steps, then full, x10
    "constant_warmup_x10": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
        ],
        milestones=[2],
    ),
    "lr_range_test": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=1.15),  # 1e-7 x1.15 a step
    **{
        name: functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=f)
        for name, f in lr_lambda_schedules().items()
    },
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_schedules_are_quiet(name):
    lrs = scheduled(HEALTHY[name], lr=1e-7 if name == "lr_range_test" else 0.1)
    assert max(lrs) > 20 * min(lr for lr in lrs if lr > 0)  # each moves the LR far: the detector is not idle here
    assert feed(LrSurgeDetector(), observations(lrs)) == []


def test_a_raise_the_loop_keeps_costs_three_steps_then_is_the_new_reference():
    lrs = [1e-4] * 20 + [1e-2] * 20 + [1e-2 * 40] + [1e-2] * 10
    found = feed(LrSurgeDetector(), observations(lrs))
    assert [(f.step, f.severity, f.evidence["kept"]) for f in found] == [
        (20, "critical", False),
        (21, "critical", False),
        (22, "critical", False),
        (23, "warning", True),
        (40, "critical", False),  # judged against the kept 1e-2 from then on
    ]


def test_a_surge_of_two_updates_is_refused_at_both():
    # helper H's H5: an HF Trainer run at LR x265 for updates 12 and 13; the second was taken as the loop's own
    # and applied (loss 3.7 -> 16)
    lrs = [1e-4] * 12 + [2.65e-2] * 2 + [1e-4] * 10
    found = feed(LrSurgeDetector(), observations(lrs))
    assert [(f.step, f.severity) for f in found] == [(12, "critical"), (13, "critical")]


def test_a_sparse_log_is_not_judged_between_its_points():
    lrs = [1e-7, 1e-4, 2e-4, 3e-4, 3e-4]  # fairseq's warmup_init_lr 1e-7, logged every 100 steps
    assert feed(LrSurgeDetector(), observations(lrs, every=100)) == []


def test_each_group_is_judged_against_its_own_highest():
    head = [1e-2] * 30  # group 1: a head at 100x the body's learning rate throughout
    body = [1e-4] * 30
    body[15] *= 100  # the body's one update at 100x is still no higher than the head's
    found = feed(LrSurgeDetector(), observations(body, groups={1: head}))
    assert [(f.step, f.signal) for f in found] == [(15, keys.LR)]
    head2 = list(head)
    head2[25] *= 50
    found = feed(LrSurgeDetector(), observations([1e-4] * 30, groups={1: head2}))
    assert [(f.step, f.signal, f.evidence["groups"]) for f in found] == [(25, f"{keys.LR}/1", {f"{keys.LR}/1": 50.0})]


def test_zero_and_non_finite_learning_rates_set_no_reference():
    lrs = [0.0, 0.0, 1e-5, 2e-5, math.nan, 3e-5, 3e-5 * 100]
    found = feed(LrSurgeDetector(), observations(lrs))
    assert [(f.step, f.severity) for f in found] == [(4, "critical"), (6, "critical")]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("at", [0, 1, 6])  # before any reference, on the second LR, after a warm-up
def test_a_non_finite_learning_rate_is_a_surge_that_is_never_taken(bad, at):
    # the non-finite detector reads the loss, gradients and weights, not the LR: an update at lr=inf (a LambdaLR that
    # divided by zero) was applied, its weights NaN (h30-A F3); it is refused however long it lasts
    lrs = [1e-3 * min(s + 1, 4) / 4 for s in range(12)]
    lrs[at : at + 5] = [bad] * 5
    found = feed(LrSurgeDetector(), observations(lrs))
    assert [(f.step, f.severity) for f in found] == [(s, "critical") for s in range(at, at + 5)]
    assert "writes NaN/Inf into the weights" in found[0].cause


def test_the_guard_skips_an_update_at_an_inf_lr_of_its_scheduler_and_trains_on():
    # Guard(scheduler=...) steps the scheduler after the skipped surge, so its next (finite) LR replaces it: before,
    # the update was applied (skip: aborted at the next step; recover: rolled back until the ladder aborted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.inf if s == 6 else 1.0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with Guard(model, opt, sched, policy="skip", probes=["loss", "grad_norm"]) as guard:
        actions = []
        for _ in range(10):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            actions.append(guard.step(loss).action)
    assert actions == ["ok"] * 6 + ["skip"] + ["ok"] * 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_factor_is_checked():
    with pytest.raises(ValueError, match=r"LrSurgeConfig.factor=1.0; allowed: a finite number > 1"):
        LrSurgeConfig(factor=1.0)
    det = LrSurgeDetector(factor=5.0)
    assert [f.step for f in feed(det, observations([1e-3] * 5 + [6e-3]))] == [5]


def test_it_is_a_default_detector():
    assert "lr_surge" in [d.name for d in default_detectors()]


def _loop(policy, *, at=8, steps=12):
    """A tiny regression under AdamW whose loop writes its LR every step (minGPT's shape): 100x for one update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    before_at = None
    with Guard(model, opt, policy=policy, probes=["loss", "grad_norm"]) as guard:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (100 if step == at else 1)
            if step == at:
                before_at = [p.detach().clone() for p in model.parameters()]
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            decision = guard.step(loss)
            if step == at:
                after_at = [p.detach().clone() for p in model.parameters()]
                action = decision.action
    return guard, before_at, after_at, action


@pytest.mark.parametrize("policy", ["skip", "recover"])
def test_the_guard_skips_the_surging_update_before_it_is_applied(policy):
    guard, before, after, action = _loop(policy)
    assert action == "skip"
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # nothing of it reached the weights
    assert [(f.step, f.kind, f.severity) for f in guard.findings if f.severity != "info"] == [
        (8, "lr_surge", "critical")
    ]
    assert not [d for d in guard.decisions if d.action == "rollback"]


def test_observe_names_it_and_applies_it():
    guard, before, after, action = _loop("observe")
    assert action == "ok" and not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert (8, "lr_surge", "critical") in [(f.step, f.kind, f.severity) for f in guard.findings]


def test_a_skipped_surge_puts_none_of_its_batch_on_the_skip_list(tmp_path):
    """The LR is at fault, not the data: with an Attribution, the surging step's batch's ordinary outliers (heavy-
    tailed targets) went to the skip list as "lr_surge at step 8: the batch's outliers" (5 ids)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x_all = torch.randn(384, 4)
    y_all = torch.randn(384, 1) * torch.distributions.StudentT(2.0).sample((384, 1)).abs()
    attribution = keel.Attribution(loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(dim=1))
    with Guard(model, opt, policy="recover", run_dir=str(tmp_path), attribution=attribution) as guard:
        for step in range(12):
            ids = torch.arange(step * 32, step * 32 + 32)
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (100 if step == 8 else 1)
            x, y = x_all[ids], y_all[ids]
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            decision = guard.step(loss, batch_ids=ids, batch=(x, y))
            if step == 8:
                assert decision.action == "skip" and [f.kind for f in decision.findings] == ["lr_surge"]
    assert not (tmp_path / "skip_list.json").exists()
