"""keel.watch and the loop's own LR scheduler: per-update, per-epoch, metric-driven (ReduceLROnPlateau), and
accelerate's gradient accumulation, whose optimizer.step() is a no-op between synchronisations."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import keel
from keel._core.errors import KeelWarning
from keel.store import RunReader

EPOCHS, BATCHES = 3, 6


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _epoch_loop(
    make_scheduler, policy: str | None, *, bad: tuple[int, ...] = (), per_update: bool = False, sync: str = "step"
):
    """mnist-style: one scheduler.step() per epoch (or per update), metric-driven when the scheduler wants one.
    Returns the LR seen at each update and the final parameters."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=sync == "deferred")  # deferred skips in-kernel
    scheduler = make_scheduler(opt)
    guard = keel.watch(model, opt, scheduler, policy=policy, sync=sync) if policy is not None else None
    lrs, update = [], 0
    metric_driven = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    for epoch in range(EPOCHS):
        for x, y in _batches(epoch, BATCHES):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if update in bad:
                model.weight.grad[0, 0] = float("nan")
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            update += 1
            if per_update:
                scheduler.step()
        if not per_update:
            scheduler.step(1.0) if metric_driven else scheduler.step()  # a plateaued metric: the LR must drop
    if guard is not None:
        guard.close()
    return lrs, [p.detach().clone() for p in model.parameters()]


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def _plateau(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)


@pytest.mark.parametrize("policy", ["observe", "skip"])
def test_an_epoch_scheduler_steps_once_per_epoch_as_the_loop_calls_it(policy):
    bare, _ = _epoch_loop(_step_lr, None)
    watched, _ = _epoch_loop(_step_lr, policy)
    assert bare == [0.1] * BATCHES + [0.05] * BATCHES + [0.025] * BATCHES
    assert watched == bare  # was 0.1 * 0.5**k at the k-th update: keel stepped it after every update


def test_under_observe_an_epoch_scheduled_loop_is_bit_identical_to_the_bare_loop():
    _, bare = _epoch_loop(_step_lr, None)
    _, watched = _epoch_loop(_step_lr, "observe")
    assert all(torch.equal(a, b) for a, b in zip(bare, watched, strict=True))


def test_a_skipped_last_update_of_an_epoch_does_not_cost_the_epoch_its_scheduler_step():
    lrs, _ = _epoch_loop(_step_lr, "skip", bad=(BATCHES - 1,))
    assert lrs[BATCHES] == 0.05


def test_reduce_lr_on_plateau_gets_the_loops_metric_and_the_run_goes_on():
    bare, _ = _epoch_loop(_plateau, None)
    watched, _ = _epoch_loop(_plateau, "skip")
    assert bare[-1] < bare[0]  # the metric plateaued: the LR came down
    assert watched == bare  # was a TypeError from keel's own scheduler.step() (no metrics) at the first update


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_a_per_update_scheduler_does_not_advance_for_a_skipped_update(sync):
    """The loop's scheduler.step() after a skipped update is swallowed, as Guard.step does not step it either.
    Under sync='deferred' the skip is known one update later, so the swallowed call is the next one."""
    bad = (4,)
    lrs, _ = _epoch_loop(_step_lr, "skip", bad=bad, per_update=True, sync=sync)
    stepped = EPOCHS * BATCHES - len(bad)
    assert lrs[-1] == pytest.approx(0.1 * 0.5 ** (stepped - 1))
    assert lrs[:5] == [0.1 * 0.5**k for k in range(5)]
    assert lrs[6] == pytest.approx(0.1 * 0.5**5)  # one step behind the bare schedule from the skip on


def test_guard_refuses_a_scheduler_whose_step_needs_a_metric():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"scheduler=ReduceLROnPlateau.*metric") as info:
        keel.Guard(model, opt, scheduler=_plateau(opt))
    assert "keel.watch" in str(info.value)


# --- accelerate's accumulate(): optimizer.step() is a no-op until the gradients synchronise ------------------
ACCUM = 4


def _accelerate_loop(policy: str | None, run_dir=None, steps: int = 6, watch_before_prepare: bool = False):
    accelerate = pytest.importorskip("accelerate")
    # accelerate's GradientState is one per process: an HF Trainer test in this worker that ended mid-epoch (an abort,
    # an out-of-memory retry) leaves its dataloader active and at its end, and then every micro-batch syncs
    accelerate.state.GradientState._reset_state()
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    guard = None
    if policy is not None and watch_before_prepare:
        guard = keel.watch(model, opt, sched, policy=policy, run_dir=run_dir)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if policy is not None and not watch_before_prepare:
        guard = keel.watch(model, opt, sched, policy=policy, run_dir=run_dir)
    losses = []
    for x, y in _batches(0, steps * ACCUM):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            losses.append(loss.item())
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    if guard is not None:
        guard.close()
    accelerator.free_memory()
    return guard, losses, params, sched.get_last_lr()[0]


def test_under_accelerate_accumulate_keel_makes_one_step_per_synchronised_update(tmp_path):
    guard, losses, params, lr = _accelerate_loop("skip", tmp_path)
    _, _, bare_params, bare_lr = _accelerate_loop(None)
    assert guard.global_step == 6  # was 24: every micro-batch's no-op step() was taken for an update
    assert lr == bare_lr and all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))
    run = RunReader(tmp_path)
    step_losses = run.signal("loss")[1].tolist()
    run.close()
    assert len(step_losses) == 6 and step_losses[0] == pytest.approx(
        sum(losses[:ACCUM]) / ACCUM, rel=1e-5
    )  # the micro-batches' mean


def test_an_optimizer_watched_before_accelerate_prepares_it_is_still_watched():
    """accelerate's wrapper calls the inner optimizer.step(None): that is no LBFGS closure (keel let it through
    unwatched, with a 'closure' warning, and watched nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        guard, _, params, _ = _accelerate_loop("skip", watch_before_prepare=True)
    _, _, bare_params, _ = _accelerate_loop(None)
    assert guard.global_step == 6 and all(torch.equal(a, b) for a, b in zip(params, bare_params, strict=True))


def test_an_lr_scheduler_keel_was_not_given_is_warned_about_once():
    # without it, a skipped update still advanced the schedule and a rollback did not restore it (an accelerate run
    # kept decaying its LR from step 11 while its weights were step 0's: helper D's D3)
    from keel._core.errors import KeelWarning

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.warns(KeelWarning, match="LR scheduler keel was not given"):
        keel.watch(model, opt).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        keel.watch(model, opt, sched).close()
