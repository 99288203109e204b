"""A resume names the optimizer settings the snapshot replaced (reviewer V12 of session 13: a run resumed with a lower
LR or other betas went on silently with the snapshot's)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from keel import Guard, KeelWarning, RecoveryConfig
from keel.guard.resumed_settings import optimizer_settings, warn_replaced


def _run(run_dir, steps, *, resume=False, scheduled=False, loop_sets=None, **adamw):
    """``loop_sets(group, step)``: what the loop writes into each param group before each update (nanochat's LR
    multiplier and Muon momentum warm-up)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), **{"lr": 1e-2, **adamw})
    for group in opt.param_groups if loop_sets is not None else ():
        group.setdefault("initial_lr", group["lr"])  # nanochat keeps each group's peak LR so
    sched = torch.optim.lr_scheduler.StepLR(opt, 5) if scheduled else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = Guard(
            model,
            opt,
            sched,
            run_dir=str(run_dir),
            resume=resume,
            recovery=RecoveryConfig(snapshot_every=5, disk_every=1),
        )
        for step in range(guard.global_step, steps):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            for group in opt.param_groups:
                if loop_sets is not None:
                    loop_sets(group, step)
            guard.step(loss)
            opt.zero_grad()
        guard.close()
    return [
        str(w.message) for w in caught if issubclass(w.category, KeelWarning) and "optimizer settings" in str(w.message)
    ]


def test_a_resume_with_another_lr_and_betas_names_what_the_snapshot_replaced(tmp_path):
    assert _run(tmp_path, 10) == []
    [said] = _run(tmp_path, 12, resume=True, lr=1e-3, betas=(0.8, 0.9))
    assert "group 0 lr 0.001 → 0.01; group 0 betas (0.8, 0.9) → (0.9, 0.999)" in said
    assert _run(tmp_path, 14, resume=True) == []  # the same settings: nothing said


def test_a_scheduled_lr_is_compared_by_its_peak_not_its_current_value(tmp_path):
    _run(tmp_path, 12, scheduled=True)  # StepLR has lowered the LR by step 12
    assert _run(tmp_path, 14, resume=True, scheduled=True) == []
    [said] = _run(tmp_path, 16, resume=True, scheduled=True, lr=5e-3)
    assert "group 0 initial_lr 0.005 → 0.01" in said and " lr " not in said.replace("initial_lr", "")


@pytest.mark.parametrize("value", [float("nan"), torch.tensor(0.1), (0.9, float("nan"))])
def test_settings_compare_nan_tensors_and_tuples_by_value(value):
    group = {"params": [], "lr": value}
    before = optimizer_settings(type("O", (), {"param_groups": [group]})(), scheduled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_replaced(before, before)  # the same values: no warning


def _nanochat_schedule(group, step):
    """nanochat's base_train.py: ``group["lr"] = group["initial_lr"] * lrm`` (a warmdown over the last steps) and a
    momentum warm-up (its Muon momentum; AdamW's beta1 here) written at every step."""
    group["lr"] = group["initial_lr"] * (1.0 if step < 6 else (20 - step) / 14)
    group["betas"] = (0.85 + 0.1 * min(step / 20, 1), 0.999)


def test_a_loop_that_writes_its_settings_every_step_is_not_told_they_were_replaced(tmp_path):
    # helper F's F3 (session 14): nanochat / modded-nanogpt resumed were told "the snapshot's optimizer settings
    # replace those this run was built with: group 0 betas (0.95, 0.999) → (0.9, 0.999) … set them after the Guard
    # is built", which the loop does: it writes its own before the next update (the resumed run is bit-identical)
    assert _run(tmp_path, 10, loop_sets=_nanochat_schedule) == []
    assert _run(tmp_path, 14, resume=True, loop_sets=_nanochat_schedule) == []


def test_only_the_settings_the_loop_left_at_the_snapshots_value_are_named(tmp_path):
    def lr_only(group, step):
        group["lr"] = group["initial_lr"] * (1.0 if step < 6 else 0.5)

    _run(tmp_path, 10, loop_sets=lr_only)
    [said] = _run(tmp_path, 12, resume=True, loop_sets=lr_only, lr=1e-3, betas=(0.8, 0.9))
    assert "group 0 initial_lr 0.001 → 0.01; group 0 betas (0.8, 0.9) → (0.9, 0.999)" in said  # the loop's lr
    assert " lr " not in said.replace("initial_lr", "")  # derives from the snapshot's initial_lr: named, lr is not
