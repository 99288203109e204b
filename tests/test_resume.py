"""A resume into a setup that differs from the snapshot's is refused before anything is loaded, saying what differs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel import Guard, RecoveryConfig
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


def _run(run_dir, model=None, make_opt=None, make_sched=None, steps=6):
    torch.manual_seed(0)
    model = model or TinyNet()
    opt = (make_opt or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)))(model)
    sched = make_sched(opt) if make_sched is not None else None
    guard = Guard(model, opt, sched, run_dir=str(run_dir), policy="recover",
                  recovery=RecoveryConfig(snapshot_every=2, disk_every=1))
    for x, y in make_batches(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        guard.recovery.disk.wait()
    guard.close()


def _resume(run_dir, model=None, make_opt=None, make_sched=None):
    torch.manual_seed(1)
    model = model or TinyNet()
    opt = (make_opt or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)))(model)
    sched = make_sched(opt) if make_sched is not None else None
    return Guard(model, opt, sched, run_dir=str(run_dir), policy="recover", resume=True), model, opt


def _refused(run_dir, **kwargs) -> str:
    with pytest.raises(ValueError) as refused:
        _resume(run_dir, **kwargs)
    return str(refused.value)


def test_resume_with_another_optimizer_class_is_refused_saying_what_differs(tmp_path):
    _run(tmp_path)
    message = _refused(tmp_path, make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    assert "optimizer: torch.optim.adamw.AdamW in the snapshot, torch.optim.sgd.SGD now" in message
    assert "snapshot of step 6" in message and str(tmp_path) in message
    assert "overwrite=True" in message


def test_resume_into_a_wider_model_is_refused_naming_the_first_differences(tmp_path):
    _run(tmp_path)
    message = _refused(tmp_path, model=TinyNet(hidden=32))
    assert "model fc1.weight: shape (16, 8) float32 in the snapshot, (32, 8) float32 now" in message
    assert "model fc1.bias: shape (16,) float32 in the snapshot, (32,) float32 now" in message
    assert "model fc2.weight" in message


def test_resume_with_other_parameter_names_or_dtypes_is_refused(tmp_path):
    _run(tmp_path)
    renamed = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    message = _refused(tmp_path, model=renamed)
    assert "model: in the snapshot, not in the model: fc1.bias, fc1.weight, fc2.bias, fc2.weight" in message
    assert "model: in the model, not in the snapshot: 0.bias, 0.weight, 2.bias, 2.weight" in message
    message = _refused(tmp_path, model=TinyNet().double())
    assert "model fc1.weight: shape (16, 8) float32 in the snapshot, (16, 8) float64 now" in message


def _two_groups(optimizer):
    def make(model):
        return optimizer([{"params": model.fc1.parameters()}, {"params": model.fc2.parameters()}], lr=1e-2)
    return make


def test_resume_with_other_parameter_groups_is_refused(tmp_path):
    _run(tmp_path)
    message = _refused(tmp_path, make_opt=_two_groups(torch.optim.AdamW))
    assert "optimizer parameter groups: sizes [4] in the snapshot, [2, 2] now" in message


def test_many_differences_are_cut_to_the_first_five(tmp_path):
    _run(tmp_path)
    message = _refused(tmp_path, model=TinyNet(hidden=32).double(), make_opt=_two_groups(torch.optim.SGD))
    assert message.count("in the snapshot") == 5 and "… and 1 more" in message


def test_resume_with_another_scheduler_or_none_is_refused(tmp_path):
    _run(tmp_path, make_sched=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10))
    message = _refused(tmp_path, make_sched=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3))
    assert ("scheduler: torch.optim.lr_scheduler.CosineAnnealingLR in the snapshot, "
            "torch.optim.lr_scheduler.StepLR now") in message
    assert "scheduler: torch.optim.lr_scheduler.CosineAnnealingLR in the snapshot, none now" in _refused(tmp_path)


def test_a_refused_resume_changes_nothing_and_releases_the_run_dir(tmp_path):
    _run(tmp_path)
    model = TinyNet(hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="another setup"):
        _resume(tmp_path, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with RunReader(tmp_path) as store:
        assert store.meta()["status"] == "finished" and "resumed_from" not in store.meta()
    guard, model, _ = _resume(tmp_path)  # the same setup resumes, in the folder the refused Guard released
    assert guard.global_step == 6
    guard.close()
