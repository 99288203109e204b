"""Parameters the optimizer trains outside the model given to keel (arcface-pytorch's margin head ``metric_fc`` beside
the backbone, one SGD over both) are snapshotted and restored with the model: a rollback restored their momentum but
not them, and a resume left them at their fresh init with the restored momentum (reviewer V21)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import keel


def _build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    head = nn.Linear(6, 5, bias=False)
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9)
    return model, head, opt


def test_a_rollback_and_a_resume_restore_a_head_the_model_does_not_hold(tmp_path):
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 5
    model, head, opt = _build()
    cfg = keel.RecoveryConfig(snapshot_every=4, disk_every=1)
    guard = keel.Guard(model, opt, run_dir=tmp_path / "run", policy="recover", recovery=cfg)
    heads, momenta, rollbacks = {}, {}, []
    for step in range(24):
        heads[step] = head.weight.detach().clone()
        momenta[step] = copy.deepcopy(opt.state[head.weight].get("momentum_buffer"))
        if step == 10:
            with torch.no_grad():
                head.weight[0, 0] = float("nan")  # a NaN written into the head: rolled back
        loss = nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        decision = guard.step(loss)
        opt.zero_grad()
        if decision.action == "rollback":
            rollbacks.append(decision.restored_step)
            assert torch.equal(head.weight, heads[decision.restored_step])
    assert rollbacks, [d.action for d in guard.decisions]
    guard.close()

    model2, head2, opt2 = _build()  # a new process builds everything afresh
    resumed = keel.Guard(model2, opt2, run_dir=tmp_path / "run", policy="recover", resume=True)
    step = resumed.global_step  # the newest snapshot on disk: the state that step started from
    assert step > rollbacks[-1]
    torch.testing.assert_close(head2.weight, heads[step], rtol=0, atol=0)  # not its fresh init
    torch.testing.assert_close(opt2.state[head2.weight]["momentum_buffer"], momenta[step], rtol=0, atol=0)
    resumed.close()
