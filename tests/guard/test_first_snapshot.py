"""The snapshot of step 0 is the state step 0 trains from: taken at the first step, so a checkpoint loaded (or an
init run) after the Guard's line is what a rollback to step 0 restores (reviewer V12: it was taken in the Guard's
constructor, and a rollback brought back the random init and an empty AdamW state)."""

import pytest
import torch
import torch.nn.functional as F

import keel
from keel import Guard, RecoveryConfig
from tests.conftest import TinyNet, make_batches


def _checkpoint():
    torch.manual_seed(1)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in make_batches(30, seed=3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


@pytest.mark.parametrize("shape", ["guard", "watch"])
def test_a_checkpoint_loaded_after_the_guard_is_what_a_rollback_to_step_0_restores(shape):
    checkpoint = _checkpoint()
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = RecoveryConfig(snapshot_every=50, quiet_steps=1)
    guard = (
        Guard(model, opt, policy="recover", recovery=config)
        if shape == "guard"
        else keel.watch(model, opt, policy="recover", recovery=config)
    )
    model.load_state_dict(checkpoint["model"])  # a fine-tune resumed from its checkpoint, after keel's line
    opt.load_state_dict(checkpoint["optimizer"])
    for step, (x, y) in enumerate(make_batches(14)):
        loss = F.mse_loss(model(x), y) * (float("nan") if step >= 2 else 1.0)
        loss.backward()
        guard.step(loss) if shape == "guard" else opt.step()
        opt.zero_grad()
        rollback = next((d for d in guard.decisions if d.action == "rollback"), None)
        if rollback is not None:
            break
    assert rollback is not None and rollback.restored_step == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name]), name
    assert int(opt.state_dict()["state"][0]["step"]) == 30  # the checkpoint's AdamW state, not an empty one
    guard.close()


class _BatchNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("shape", ["guard", "watch"])
def test_the_snapshot_of_step_0_holds_the_batchnorm_statistics_from_before_the_first_forward(shape):
    """Reviewer M: taken at the first step, after that step's forward, the snapshot of step 0 held BatchNorm's
    running statistics after one batch (num_batches_tracked 1) with the weights from before it."""
    torch.manual_seed(0)
    model = _BatchNormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = RecoveryConfig(snapshot_every=50)
    guard = (
        Guard(model, opt, policy="recover", recovery=config)
        if shape == "guard"
        else keel.watch(model, opt, policy="recover", recovery=config)
    )
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    guard.step(F.mse_loss(model(x), y).detach()) if shape == "guard" else opt.step()
    [snapshot] = guard.recovery.ring.before(0)
    for name, value in start.items():
        assert torch.equal(snapshot.tensors["model/" + name], value), name
    assert int(model.bn.num_batches_tracked) >= 1  # the live model went on (keel copied, changed nothing)
    guard.close()


def test_a_checkpoint_loaded_after_the_guard_is_still_the_snapshot_of_step_0_with_buffers_held():
    """The buffers held at the Guard's line are not used once a checkpoint was loaded after it (its weights changed
    since): the snapshot keeps the checkpoint's weights, and its buffers as they are at the first step."""
    torch.manual_seed(1)
    trained = _BatchNormNet()
    trained(torch.randn(32, 8) * 3 + 1)  # running statistics of its own
    checkpoint = {k: v.clone() for k, v in trained.state_dict().items()}
    torch.manual_seed(0)
    model = _BatchNormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, opt, policy="recover", recovery=RecoveryConfig(snapshot_every=50))
    model.load_state_dict(checkpoint)
    x, y = make_batches(1)[0]
    loss = F.mse_loss(model(x), y)
    loss.backward()
    guard.step(loss)
    [snapshot] = guard.recovery.ring.before(0)
    for name in ("fc.weight", "out.bias"):
        assert torch.equal(snapshot.tensors["model/" + name], checkpoint[name]), name
    assert int(snapshot.tensors["model/bn.num_batches_tracked"]) == int(checkpoint["bn.num_batches_tracked"]) + 1
    guard.close()
