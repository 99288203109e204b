"""The opposing-signals probe: its cadence, its statistics against a float64 re-derivation, side-effect freedom, and a
tiny model whose two groups of examples are made to oppose against a healthy control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel.guard import Guard
from keel.signals import OpposingSignalsConfig, OpposingSignalsProbe, StepContext, opposing_groups, opposing_stats
from tests.signals.contexts import step_context

GROUP = 8  # examples in each opposing group of the tiny dataset


def per_example_bce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y, reduction="none")


def two_groups(*, conflict: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group A (x₀ = 3, label 1), group B (x₀ = 3 with conflict, else −3; label 0), 16 examples labelled by x₁'s sign.

    With ``conflict`` A and B share one strong feature and disagree on its label: opposing signals.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.full((GROUP, 1), 3.0), 0.1 * torch.randn(GROUP, 1, generator=g)], 1)
    b = torch.cat([torch.full((GROUP, 1), 3.0 if conflict else -3.0), 0.1 * torch.randn(GROUP, 1, generator=g)], 1)
    c = torch.cat([torch.zeros(16, 1), torch.randn(16, 1, generator=g)], 1)
    return torch.cat([a, b, c]), torch.cat([torch.ones(GROUP), torch.zeros(GROUP), (c[:, 1] > 0).float()])


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))


def context(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> StepContext:
    return step_context(model, optimizer, step=step, with_grad_only=True)


def train(*, conflict: bool, steps: int, every: int = 1, lr: float = 2.0) -> list[dict[str, float]]:
    """Full-batch gradient descent on `two_groups`; the probe's measurements at each step (``{}`` between them)."""
    model, batch = tiny_mlp(), two_groups(conflict=conflict)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    probe = OpposingSignalsProbe(probe_set=batch, loss_fn=per_example_bce, every=every, top_k=4)
    seen = []
    for step in range(steps):
        optimizer.zero_grad()
        per_example_bce(model, batch).mean().backward()
        seen.append({k: float(v) for k, v in probe.measure(context(step, model, optimizer)).items()})
        optimizer.step()
    return seen


def test_it_emits_nothing_between_measurements_nor_at_the_first_one():
    seen = train(conflict=True, steps=9, every=3)
    assert [sorted(s) for s in seen] == [
        [],
        [],
        [],
        [keys.OPPOSING_OPPOSITION, keys.OPPOSING_ROSE],  # the second measurement: one change, no antiphase yet
        [],
        [],
        [keys.OPPOSING_ANTIPHASE, keys.OPPOSING_OPPOSITION, keys.OPPOSING_ROSE],
        [],
        [],
    ]


def test_two_groups_with_conflicting_labels_oppose_in_antiphase_and_a_healthy_control_does_not():
    # the same model, data layout and learning rate; only the conflict between groups A and B differs
    opposing, healthy = train(conflict=True, steps=40)[-10:], train(conflict=False, steps=40)[-10:]
    assert all(s[keys.OPPOSING_ANTIPHASE] < -0.9 for s in opposing), opposing
    assert all(s[keys.OPPOSING_ANTIPHASE] > 0.5 for s in healthy), healthy
    assert min(s[keys.OPPOSING_OPPOSITION] for s in opposing) > 0.1
    assert max(s[keys.OPPOSING_OPPOSITION] for s in healthy) < 1e-3
    # antiphase: about half the examples rise at one step and fall at the next, where healthy descent has none rise
    assert all(0.25 < s[keys.OPPOSING_ROSE] < 0.75 for s in opposing)
    assert all(s[keys.OPPOSING_ROSE] < 0.1 for s in healthy)


def test_the_groups_it_names_are_the_two_opposing_groups():
    model, batch = tiny_mlp(), two_groups(conflict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    history = []
    for _ in range(30):
        with torch.no_grad():
            history.append(per_example_bce(model, batch))
        optimizer.zero_grad()
        per_example_bce(model, batch).mean().backward()
        optimizer.step()
    rising, falling = (set(g.tolist()) for g in opposing_groups(torch.stack(history), top_k=4))
    group_a, group_b = set(range(GROUP)), set(range(GROUP, 2 * GROUP))
    assert (rising <= group_a and falling <= group_b) or (rising <= group_b and falling <= group_a)


def reference(history: np.ndarray, top_k: int) -> dict[str, float]:
    """The probe's definitions re-derived in float64 with numpy: sorting, not topk; np.corrcoef, not sums."""
    delta = history[-1] - history[-2]
    order = np.argsort(delta)
    rising, falling = order[-top_k:], order[:top_k]
    out = {
        keys.OPPOSING_ROSE: float(np.mean(delta > 0)),
        keys.OPPOSING_OPPOSITION: max(0.0, min(delta[rising].mean(), -delta[falling].mean())),
    }
    if len(history) >= 3:
        a, b = history[:, rising].mean(1), history[:, falling].mean(1)
        out[keys.OPPOSING_ANTIPHASE] = 0.0 if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])
    return out


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(2, 8),
    examples=st.integers(2, 40),
    top_k=st.integers(1, 20),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_statistics_match_an_independent_float64_derivation(seed, rows, examples, top_k, scale):
    top_k = min(top_k, examples // 2)
    history = np.random.default_rng(seed).exponential(scale, size=(rows, examples))  # losses: positive, no ties
    got = {k: float(v) for k, v in opposing_stats(torch.tensor(history, dtype=torch.float32), top_k).items()}
    want = reference(history, top_k)
    assert got.keys() == want.keys()
    for key, value in want.items():
        tolerance = 2e-3 if key == keys.OPPOSING_ANTIPHASE else 1e-5 * scale
        assert abs(got[key] - value) <= tolerance + 1e-5 * abs(value), (key, got[key], value)


def test_a_constant_history_has_no_antiphase_and_no_opposition():
    out = opposing_stats(torch.ones(5, 10), top_k=3)
    assert {k: float(v) for k, v in out.items()} == {
        keys.OPPOSING_ROSE: 0.0,
        keys.OPPOSING_OPPOSITION: 0.0,
        keys.OPPOSING_ANTIPHASE: 0.0,
    }


def test_training_under_the_probe_is_bit_identical_to_training_without_it():
    # dropout draws from the RNG and the probe's forward runs in eval mode with the RNG restored
    def run(with_probe: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batch = two_groups(conflict=True)
        probes = [OpposingSignalsProbe(probe_set=batch, loss_fn=per_example_bce, every=2)] if with_probe else []
        with Guard(model, optimizer, probes=["loss", *probes]) as guard:
            for _ in range(6):
                loss = per_example_bce(model, batch).mean()
                loss.backward()
                guard.step(loss)
                optimizer.zero_grad()
        assert model.training
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False), strict=True))


def test_its_signals_reach_the_detectors_through_a_guard():
    seen: dict[int, dict[str, float]] = {}

    class Capture:
        name = "capture"

        def update(self, obs):
            seen[obs.step] = dict(obs.values)
            return []

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model, batch = tiny_mlp(), two_groups(conflict=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    probe = OpposingSignalsProbe(OpposingSignalsConfig(probe_set=batch, loss_fn=per_example_bce, every=5))
    with Guard(model, optimizer, probes=["loss", probe], detectors=[Capture()]) as guard:
        for _ in range(16):
            loss = per_example_bce(model, batch).mean()
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
    assert guard.findings == []
    measured = sorted(s for s, values in seen.items() if keys.OPPOSING_OPPOSITION in values)
    assert measured == [5, 10, 15]
    assert keys.OPPOSING_ANTIPHASE in seen[10] and keys.OPPOSING_ANTIPHASE not in seen[5]


def test_without_a_probe_set_it_warns_once_and_measures_nothing():
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per_example_bce(model, two_groups(conflict=False)).mean().backward()
    probe = OpposingSignalsProbe()
    with pytest.warns(UserWarning, match="no probe set"):
        assert probe.measure(context(0, model, optimizer)) == {}
    assert probe.measure(context(50, model, optimizer)) == {}


BATCH = two_groups(conflict=False)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"every": 0}, "every=0"),
        ({"every": 2.5}, "every"),
        ({"top_k": 0}, "top_k=0"),
        ({"history": 2}, "history=2"),
        ({"probe_set": BATCH}, "both given, or neither"),
        ({"loss_fn": per_example_bce}, "both given, or neither"),
        ({"probe_set": BATCH, "loss_fn": "bce"}, "loss_fn"),
        ({"probe_set": (BATCH[0][:5], BATCH[1][:5]), "loss_fn": per_example_bce}, "5 examples with top_k=4"),
        ({"probe_set": (BATCH[0], BATCH[1][:5]), "loss_fn": per_example_bce}, "first dimensions"),
        ({"probe_set": "not a batch", "loss_fn": per_example_bce}, "first dimensions"),
    ],
)
def test_bad_config_is_one_clear_error_naming_the_value(fields, match):
    with pytest.raises(ValueError, match=match):
        OpposingSignalsConfig(**fields)
