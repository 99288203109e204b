"""Under ``recover``, an update that leaves NaN/Inf weights is rolled back inside the same ``Guard.step``, before the
loop's next forward (`keel.guard.weights_check`).

Outside-in: pytorch/examples' reinforcement_learning/reinforce.py (Policy 4-128-2 with dropout, Adam 1e-2, one update
per episode, actions sampled from ``Categorical(probs)`` between updates). Before, an update that wrote an Inf weight
made the next episode's ``Categorical`` raise ("Expected parameter probs … found invalid values") before keel's next
step could roll back: the run failed (helper D's D7).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

import keel

BROKEN_UPDATE = 6  # the update whose optimizer.step() leaves an Inf weight


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine1, self.dropout, self.affine2 = nn.Linear(4, 16), nn.Dropout(p=0.6), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.affine2(F.relu(self.dropout(self.affine1(x)))), dim=1)


def _reinforce(policy_name: str, *, broken: set[int], value: float = math.inf, episodes: int = 10, **kw):
    """reinforce.py's loop on a random walk for states; the updates in ``broken`` overflow a weight inside
    ``optimizer.step()`` (an optimizer step post-hook, as an overflowing update would). Returns the watch and the
    finiteness of the weights the loop saw right after each ``optimizer.step()``."""
    torch.manual_seed(0)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    updates: list[int] = []

    def overflow(*_: object) -> None:
        if len(updates) in broken:
            with torch.no_grad():
                policy.affine1.weight[0, 0] = value

    optimizer.register_step_post_hook(overflow)
    guard = keel.watch(policy, optimizer, policy=policy_name, recovery=keel.RecoveryConfig(snapshot_every=2), **kw)
    seen_finite = []
    try:
        for _ in range(episodes):
            log_probs, rewards = [], []
            state = torch.zeros(1, 4)
            for _ in range(8):
                m = Categorical(policy(state))  # raises on NaN probabilities
                action = m.sample()
                log_probs.append(m.log_prob(action))
                rewards.append(1.0)
                state = state + 0.1 * torch.randn(1, 4)
            returns = torch.tensor(rewards).cumsum(0).flip(0)
            returns = (returns - returns.mean()) / (returns.std() + 1e-6)
            optimizer.zero_grad()
            torch.cat([-lp * r for lp, r in zip(log_probs, returns, strict=True)]).sum().backward()
            optimizer.step()
            seen_finite.append(all(bool(torch.isfinite(p).all()) for p in policy.parameters()))
            updates.append(len(updates))
    finally:
        guard.close()  # a loop that raised leaves no watch open (keel's backward hooks) for the tests after it
    return guard, seen_finite


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_an_update_that_leaves_non_finite_weights_is_rolled_back_before_the_next_rollout(value):
    guard, seen_finite = _reinforce("recover", broken={BROKEN_UPDATE}, value=value)
    assert all(seen_finite)  # the loop never saw the broken weights: the next Categorical did not raise
    (decision,) = guard.decisions
    assert (decision.step, decision.action) == (BROKEN_UPDATE, "rollback")
    assert decision.restored_step is not None and decision.restored_step <= BROKEN_UPDATE
    (finding,) = decision.findings
    assert (finding.kind, finding.severity, finding.signal) == ("non_finite", "critical", "param/norm")
    assert finding.evidence["parameters"] == ["affine1.weight"] and finding.evidence["after_update"] is True
    assert guard.global_step == 10


def test_an_update_that_breaks_the_weights_every_time_ends_in_the_rollback_cap_not_a_loop():
    with pytest.raises(keel.TrainingAborted, match="rollbacks within"):
        _reinforce("recover", broken=set(range(BROKEN_UPDATE, 100)))


@pytest.mark.parametrize("policy_name", ["observe", "skip"])
def test_without_recover_the_weights_are_not_checked_after_the_update(policy_name):
    # as the bare loop: nothing rolls back (Categorical validates its probs, or torch.multinomial raises when
    # distribution validation is off in this process, as code run earlier in an xdist worker can leave it)
    with pytest.raises((ValueError, RuntimeError), match="Categorical|probs|probability tensor"):
        _reinforce(policy_name, broken={BROKEN_UPDATE})


def test_finite_weights_whose_float32_norm_overflows_are_not_rolled_back():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.bias.fill_(3e38)  # finite; its float32 norm squared is not
    guard = keel.Guard(model, opt, policy="recover")
    for _ in range(3):
        model.weight.sum().backward()
        assert guard.step(torch.tensor(1.0)).action == "ok"
        opt.zero_grad()
    guard.close()
    assert guard.decisions == []


def test_a_trainable_parameter_the_forward_never_uses_is_not_checked():
    """A module defined but not called (its weights left as torch.empty made them, NaN here) gets no gradient, and
    no update changes it: the check reads only the parameters that had one."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 1)})
    with torch.no_grad():
        model["unused"].weight.fill_(math.nan)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, policy="recover")
    for _ in range(3):
        loss = model["used"](torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        assert guard.step(loss).action == "ok"
        opt.zero_grad()
    guard.close()
    assert guard.decisions == []


def test_with_an_enabled_grad_scaler_the_broken_update_is_rolled_back_at_the_next_step_as_before():
    """The actuator's rollback closes the GradScaler's step, which its update has closed already: with an enabled
    scaler the check is off, and the next step finds the parameters (no keel_error, no crash)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    updates: list[int] = []

    def overflow(*_: object) -> None:
        if len(updates) == 3:
            with torch.no_grad():
                model.weight[0, 0] = math.inf

    opt.register_step_post_hook(overflow)
    config = keel.RecoveryConfig(snapshot_every=1, quiet_steps=0)
    guard = keel.Guard(model, opt, policy="recover", scaler=scaler, recovery=config)
    actions = []
    for _ in range(6):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad()
        updates.append(len(updates))
    guard.close()
    assert actions == ["ok", "ok", "ok", "ok", "rollback", "ok"]
    assert [f.kind for f in guard.findings] == ["non_finite"]


def test_the_snapshot_of_the_broken_update_s_own_step_is_restored_and_a_broken_first_update_too():
    """The state the broken update started from is finite: its snapshot is the one to restore (an older one was, and an
    update at step 0 that broke the weights aborted the run, no older snapshot being kept: helpers B and C)."""
    guard, _ = _reinforce("recover", broken={BROKEN_UPDATE})
    assert [(d.step, d.restored_step) for d in guard.decisions] == [(BROKEN_UPDATE, BROKEN_UPDATE)]
    guard, seen_finite = _reinforce("recover", broken={0})
    assert [(d.step, d.action, d.restored_step) for d in guard.decisions] == [(0, "rollback", 0)] and all(seen_finite)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_broken_weight_of_a_wide_layer_is_found_by_its_sum(bad):
    """Weights large on average are read by a plain sum per tensor (`keel.signals.norms.finiteness_witness`): a -Inf,
    which a max would miss, is found too, and only the broken tensor is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.register_step_post_hook(lambda *_: model[1].weight.data.view(-1)[-1].fill_(bad) if len(actions) == 3 else None)
    guard = keel.Guard(model, opt, policy="recover", recovery=keel.RecoveryConfig(snapshot_every=1))
    actions: list[str] = []
    for _ in range(5):
        loss = model(torch.randn(4, 256)).square().mean()
        loss.backward()
        actions.append(guard.step(loss).action)
        opt.zero_grad()
    guard.close()
    assert actions == ["ok", "ok", "ok", "rollback", "ok"]
    (finding,) = [f for f in guard.decisions[0].findings if f.evidence.get("after_update")]
    assert finding.evidence["parameters"] == ["1.weight"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_weights_the_loop_wrote_before_the_update_are_not_said_to_begin_after_it():
    """An Inf written into a weight by the loop between backward and ``guard.step`` (a renorm of a zero row, an adapter
    merge) is found right after the update; the rollback said 'trouble began at step N+1' at step N and blamed the
    update alone (reviewer h26 V2)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.Guard(model, opt, policy="recover", recovery=keel.RecoveryConfig(snapshot_every=1))
    for step in range(6):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        if step == 4:
            with torch.no_grad():
                model.weight[0, 0] = math.inf  # after backward: loss and gradients stay finite
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    (rollback,) = guard.decisions
    assert (rollback.step, rollback.action, rollback.restored_step) == (4, "rollback", 4)
    assert "trouble found right after the update of step 4" in rollback.reason
    assert "trouble began at step 5" not in rollback.reason
    (finding,) = [f for f in rollback.findings if f.evidence.get("after_update")]
    assert "or the loop wrote them" in finding.cause and torch.isfinite(model.weight).all()
