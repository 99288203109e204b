"""keel.watch on off-policy RL loops with target networks, shaped as CleanRL's dqn.py and sac_continuous_action.py:
a target network is a copy of the online network that the loop updates itself, through ``.data``
(``target_param.data.copy_(tau * param.data + (1 - tau) * target_param.data)``), which moves no version counter."""

from __future__ import annotations

import warnings
from copy import deepcopy

import pytest
import torch
from torch import nn

from keel import KeelWarning, RecoveryConfig, TrainingAborted
from keel.integrations.watch import _copy_shapes, adversarial_detectors, watch

STEPS, NAN_AFTER = 24, 10


def _polyak(online: nn.Module, target: nn.Module, tau: float = 0.5) -> None:
    for param, target_param in zip(online.parameters(), target.parameters(), strict=True):
        target_param.data.copy_(tau * param.data + (1 - tau) * target_param.data)


class _Critic(nn.Module):
    """Q(s, a) of SAC/TD3's critic (CleanRL's SoftQNetwork, smaller)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.cat([s, a], 1))))


def _dqn(*, track: bool):
    """A DQN step per iteration on fixed random transitions; a NaN written into the Q-network after update
    NAN_AFTER (a bad kernel, a bit flip), before the loop copies it into its target network."""
    torch.manual_seed(0)
    q = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    target = deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    s, a, r, s2 = torch.randn(32, 2), torch.randint(0, 2, (32, 1)), torch.rand(32), torch.randn(32, 2)
    guard = watch(q, opt, policy="recover", detectors=adversarial_detectors(), recovery=_recovery())
    if track:
        guard.track(target, name="target")
    losses = []
    try:
        for step in range(STEPS):
            with torch.no_grad():
                td_target = r + 0.99 * target(s2).max(dim=1).values
            loss = nn.functional.mse_loss(td_target, q(s).gather(1, a).squeeze(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == NAN_AFTER:
                with torch.no_grad():
                    q[0].weight[0, 0] = float("nan")
            _polyak(q, target)
    except TrainingAborted:
        pass
    finally:
        guard.close()
    return q, target, guard, losses


def _sac_critics(*, track: bool):
    """SAC's critic update: one optimizer over qf1 and qf2, watched as one module (nn.ModuleList), each with its
    own target network."""
    torch.manual_seed(0)
    qf1, qf2 = _Critic(), _Critic()
    targets = deepcopy(qf1), deepcopy(qf2)
    opt = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=1e-3)
    s, a, r = torch.randn(32, 2), torch.rand(32, 1), torch.rand(32)
    guard = watch(nn.ModuleList([qf1, qf2]), opt, policy="recover", detectors=adversarial_detectors(),
                  recovery=_recovery())  # fmt: skip
    if track:
        for i, target in enumerate(targets):
            guard.track(target, name=f"target{i}")
    try:
        for step in range(STEPS):
            with torch.no_grad():
                y = r + 0.99 * torch.min(targets[0](s, a), targets[1](s, a)).view(-1)
            loss = nn.functional.mse_loss(qf1(s, a).view(-1), y) + nn.functional.mse_loss(qf2(s, a).view(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == NAN_AFTER:
                with torch.no_grad():
                    qf1.fc1.weight[0, 0] = float("nan")
            _polyak(qf1, targets[0])
            _polyak(qf2, targets[1])
    except TrainingAborted:
        pass
    finally:
        guard.close()
    return targets, guard


def _recovery() -> RecoveryConfig:
    return RecoveryConfig(snapshot_every=2, quiet_steps=0)


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _named(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, KeelWarning) and "guard.track" in str(w.message)]


def test_a_rollback_names_the_target_network_the_loop_writes_through_data():
    # was: nothing named it (the loop's .data.copy_ moves no version counter) and the run ended in skips of NaN
    # losses and an abort, the target network NaN for good
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, target, guard, _ = _dqn(track=False)
    assert [d.action for d in guard.decisions][0] == "rollback"
    assert _finite(q) and not _finite(target)  # keel restores only what it was given ...
    named = _named(caught)
    assert len(named) == 1 and "Sequential" in named[0] and "target" in named[0]  # ... and says so, once


def test_a_registered_target_network_is_restored_with_the_q_network():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, target, guard, losses = _dqn(track=True)
    assert [d.action for d in guard.decisions] == ["rollback"]
    assert _finite(q) and _finite(target)
    assert all(torch.isfinite(torch.tensor(losses[NAN_AFTER + 2 :])))
    assert not _named(caught)


@pytest.mark.parametrize("track", [False, True], ids=["unregistered", "registered"])
def test_the_target_networks_of_a_critic_pair_watched_as_one_module(track: bool):
    # was: not named: a target copies one critic of the ModuleList, not the list's parameter shapes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets, guard = _sac_critics(track=track)
    assert [d.action for d in guard.decisions][0] == "rollback"
    assert _finite(targets[0]) is track
    named = _named(caught)
    assert len(named) == (0 if track else 1)
    assert all("_Critic" in text for text in named)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.ModuleList(), []),
        (nn.ReLU(), []),
        (nn.Linear(2, 3), [[(3, 2), (3,)]]),
        (nn.ModuleList([nn.Linear(2, 3), nn.Linear(2, 3)]), [[(3, 2), (3,), (3, 2), (3,)], [(3, 2), (3,)]]),
        (nn.ModuleDict({"a": nn.Linear(1, 1), "b": nn.ReLU()}), [[(1, 1), (1,)]]),
        (nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)), [[(1, 1), (1,), (1, 1), (1,)]]),  # one network
    ],
    ids=["empty-list", "no-parameters", "one-network", "critic-pair", "dict", "sequential"],
)
def test_the_shapes_a_copy_is_known_by(model: nn.Module, expected: list) -> None:
    assert [[tuple(s) for s in shapes] for shapes in _copy_shapes(model)] == expected


def test_an_actor_and_its_critic_with_the_default_detectors_are_told_once_to_take_the_adversarial_ones():
    """TD3's loop: the critic's TD loss, then the actor's loss through the critic, ``-qf1(s, actor(s)).mean()``. With
    the defaults, clean CleanRL-shaped TD3 and SAC runs under recover were aborted (the critic's TD loss rises as
    the values are learnt; SAC's actor loss changes sign)."""
    torch.manual_seed(0)
    actor, critic = nn.Sequential(nn.Linear(2, 1), nn.Tanh()), _Critic()
    a_opt, q_opt = torch.optim.Adam(actor.parameters()), torch.optim.Adam(critic.parameters())
    s, a, y = torch.randn(16, 2), torch.rand(16, 1), torch.rand(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(critic, q_opt), watch(actor, a_opt):
            for _ in range(3):
                q_opt.zero_grad()
                nn.functional.mse_loss(critic(s, a).view(-1), y).backward()
                q_opt.step()
                a_opt.zero_grad()
                (-critic(s, actor(s)).mean()).backward()
                a_opt.step()
    told = [str(w.message) for w in caught if issubclass(w.category, KeelWarning) and "adversarial" in str(w.message)]
    assert len(told) == 1 and "actor and its critic" in told[0] and "adversarial_detectors()" in told[0]


@pytest.mark.slow  # two subprocesses of ~6 s; the tests above make the same claims in-process
def test_the_dqn_example_runs_as_a_user_runs_it(tmp_path):
    from tests.integrations.test_examples import run_example

    out = run_example("dqn_offpolicy.py", "--steps", "2000", "--nan-weight", "1200", "--out", str(tmp_path / "a"))
    assert "rollback" in out and "abort" not in out and "target network finite: True" in out
    out = run_example("dqn_offpolicy.py", "--steps", "2000", "--nan-weight", "1200", "--no-track", "--out",
                      str(tmp_path / "b"))  # fmt: skip
    assert "aborted" in out and "target network finite: False" in out
