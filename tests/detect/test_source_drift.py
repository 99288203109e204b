"""The source-drift detector: healthy multi-source series name nothing; a source that turns bad mid-run is named.

The synthetic series (`series`) also drive the registry's contract tests (tests/detect/drives.py). The end-to-end
tests train a tiny classifier on three sources with `keel.signals.SourceGradientsProbe`, one source's labels turned
to noise from step 180 on.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import Observation, keys
from keel.detect import SourceDriftConfig, SourceDriftDetector
from keel.detect.source_drift import members

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = (keys.SOURCE_LOSS_PER_SOURCE, keys.SOURCE_GRAD_NORM_PER_SOURCE, keys.SOURCE_GRAD_COS_PER_SOURCE)


def series(
    seed: int,
    *,
    n: int = 150,
    sources: int = 3,
    bad: int | None = None,
    bad_from: int = 0,
    jump: float = 10.0,
    trend: float = 3.0,
    outliers: float = 0.02,
    present: float = 0.9,
    every: int = 10,
    step_losses: bool = False,
) -> list[Observation]:
    """Per-source loss, gradient norm and cosine of a healthy run with heterogeneous sources: each its own level
    and noise, a common decay, a slow differential drift of up to ``trend`` noise units over the run, one-batch
    outliers (up to 10 noise units), sources missing from some batches. Source ``bad``'s values move ``jump``
    noise units the worse way (loss and norm up, cosine down) from measurement ``bad_from`` on — in units of the
    noisiest source's relative noise, since a source is judged against the others' noise as well as its own.
    ``step_losses``: each loss also as the loop's step loss of 5 examples (`keel.signals.source_losses`'s keys)."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.5, 3.0, (3, sources))
    noise = rng.uniform(0.01, 0.3, (3, sources)) * level
    slope = rng.uniform(-trend, trend, (3, sources)) * noise / n
    step = level * (noise / level).max(axis=1, keepdims=True)  # one noise unit of the noisiest source, per feature
    out = []
    for i in range(n):
        decay = 1.0 + 2.0 * math.exp(-i / 30)
        values: dict[str, tuple[list[str], list[float]]] = {}
        for s in range(sources):
            if rng.random() > present:
                continue
            x = level[:, s] * np.array([decay, decay, 1.0]) + slope[:, s] * i + noise[:, s] * rng.standard_normal(3)
            if rng.random() < outliers:
                x = x + noise[:, s] * rng.uniform(-10, 10, 3)
            if s == bad and i >= bad_from:
                x = x + jump * step[:, s] * np.array([1.0, 1.0, -1.0])
            for family, v in zip(FAMILIES, x, strict=True):
                names, got = values.setdefault(family, ([], []))
                names.append(f"src{s}")
                got.append(float(v if family != FAMILIES[2] else np.tanh(v - 1.0)))
        per_param = {family: (tuple(names), got) for family, (names, got) in values.items()}
        if step_losses and FAMILIES[0] in per_param:
            names, got = per_param[FAMILIES[0]]
            per_param[keys.SOURCE_STEP_LOSS_PER_SOURCE] = (names, list(got))
            per_param[keys.SOURCE_STEP_COUNT_PER_SOURCE] = (names, [5.0] * len(names))
        out.append(Observation(step=every * i, per_param=per_param))
    return out


def _named(observations, det=None):
    det = det or SourceDriftDetector()
    return [(o.step, f.evidence["source"]) for o in observations for f in det.update(o)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), sources=st.integers(2, 6))
def test_healthy_heterogeneous_sources_name_nothing(seed, sources):
    assert _named(series(seed, sources=sources)) == []


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31),
    sources=st.integers(2, 6),
    bad_from=st.integers(40, 120),
    jump=st.floats(12.0, 40.0),
)
def test_a_source_that_turns_bad_mid_run_is_named_within_the_short_window(seed, sources, bad_from, jump):
    bad = sources - 1
    named = _named(series(seed, sources=sources, bad=bad, bad_from=bad_from, jump=jump, present=1.0, outliers=0.0))
    window = SourceDriftConfig().short_window
    assert named and named[0][1] == f"src{bad}", named
    assert bad_from * 10 <= named[0][0] <= (bad_from + window + 1) * 10
    assert {s for _, s in named} == {f"src{bad}"}


@pytest.mark.parametrize("seed", range(5))
def test_one_source_whose_loss_collapses_does_not_get_the_healthy_ones_named(seed):
    # byte-0x00 windows in one of three sources on the proxy LM: its loss fell 2.4 -> 0.0004 within 50 steps; the
    # others' reference (then the mean of the other two) halved and both healthy sources were named, 5 seeds of 5
    rng = np.random.default_rng(seed)
    observations = []
    for i in range(80):
        loss = {s: 2.0 * (1 - 0.002 * i) * (1 + 0.05 * rng.standard_normal()) for s in "abc"}
        if i >= 40:
            loss["c"] = 0.001 * (1 + 0.05 * rng.standard_normal())
        observations.append(Observation(step=i, values={keys.SOURCE_LOSS_PER_SOURCE + s: v for s, v in loss.items()}))
    assert not {"a", "b"} & {s for _, s in _named(observations)}


def test_a_persistent_offset_from_the_first_measurement_is_not_a_drift():
    # sources differ by design (code is harder than prose): only a change is named
    assert _named(series(3, bad=1, bad_from=0, jump=30.0)) == []


def test_a_one_batch_outlier_is_not_named():
    obs = series(4, outliers=0.0, present=1.0)
    obs[80].per_param[keys.SOURCE_LOSS_PER_SOURCE][1][0] *= 20.0  # src0's loss, one measurement
    assert _named(obs) == []


def test_the_finding_names_the_features_and_explains_itself():
    det = SourceDriftDetector()
    found = [f for o in series(5, bad=0, bad_from=60, jump=15.0, present=1.0, outliers=0.0) for f in det.update(o)]
    (f,) = found
    assert (f.kind, f.severity, f.evidence["source"]) == ("source_drift", "warning", "src0")
    assert set(f.evidence["features"]) <= {"loss", "grad_norm", "disagreement"} and f.evidence["features"]
    assert f.signal.startswith("source/") and f.signal.endswith("/src0")
    assert "Source 'src0'" in f.cause and "MUD-HoG" in json.dumps(f.evidence["advice"])
    json.dumps(f.evidence)


def test_members_reads_zero_d_signals_and_families_alike():
    obs = Observation(
        step=0,
        values={"source/loss/web": 2.0, "source/loss/": 9.0, "loss": 1.0},
        per_param={"source/loss/": (("code",), [3.0])},
    )
    assert members(obs, keys.SOURCE_LOSS_PER_SOURCE) == {"code": 3.0, "web": 2.0}


def test_state_round_trip_continues_identically():
    obs = series(6, bad=2, bad_from=70, jump=12.0)
    whole = SourceDriftDetector()
    expected = [[f.to_dict() for f in whole.update(o)] for o in obs]
    half = SourceDriftDetector()
    for o in obs[:75]:
        half.update(o)
    resumed = SourceDriftDetector()
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    got = [[f.to_dict() for f in resumed.update(o)] for o in obs[75:]]
    assert got == expected[75:] and any(expected)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("warmup", 5, "allowed: > short_window"),
        ("short_window", 0, "an int >= 1"),
        ("long_alpha", 1.0, "0 < long_alpha < 1"),
        ("long_alpha", "0.1", "allowed"),
        ("z", -1.0, "a finite number > 0"),
        ("min_effect", math.inf, "a finite number > 0"),
        ("loss_block", 0, "an int >= 1"),
    ],
)
def test_bad_config_names_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"SourceDriftConfig.{field}=.*{allowed}"):
        SourceDriftConfig(**{field: value})


# --- end to end: a tiny classifier, three sources, one turns to label noise ---------------------------------------
def train_three_sources(seed: int, *, corrupt_from: int | None, steps: int = 300, every: int = 5):
    """A 16-32-4 MLP on three Gaussian sources labelled by one linear teacher; from ``corrupt_from`` on, source 2's
    labels are uniform noise. Returns the run's source_drift findings and keel_error findings."""
    from keel.guard import Guard
    from keel.signals import DEFAULT_PROBES, SourceGradientsConfig, SourceGradientsProbe

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher, centers = torch.randn(16, 4, generator=g), torch.randn(3, 16, generator=g) * 0.5
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = SourceGradientsProbe(
        SourceGradientsConfig(
            source_fn=lambda batch: batch[2],
            loss_fn=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none"),
            every=every,
        )
    )
    guard = Guard(model, opt, policy="observe", probes=[*DEFAULT_PROBES, probe], detectors=[SourceDriftDetector()])
    for step in range(steps):
        source = torch.randint(0, 3, (48,), generator=g)
        x = centers[source] + torch.randn(48, 16, generator=g)
        y = (x @ teacher).argmax(1)
        if corrupt_from is not None and step >= corrupt_from:
            y = torch.where(source == 2, torch.randint(0, 4, (48,), generator=g), y)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss, batch=(x, y, source))
        opt.zero_grad(set_to_none=True)
    guard.close()
    drift = [(f.step, f.evidence["source"]) for f in guard.findings if f.kind == "source_drift"]
    return drift, [f for f in guard.findings if f.kind == "keel_error"]


def test_end_to_end_the_source_whose_labels_turn_to_noise_is_named():
    drift, errors = train_three_sources(0, corrupt_from=180)
    assert errors == []
    assert [s for _, s in drift] == ["2"] and 180 <= drift[0][0] <= 180 + 8 * 5


def test_end_to_end_a_healthy_three_source_run_names_none():
    assert train_three_sources(0, corrupt_from=None) == ([], [])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 10))
def test_end_to_end_across_seeds(seed):
    # seeds 0-9 measured at commit time: the noisy source named at step 195 every time, no healthy run named any
    # (the 600-step healthy runs too); label *shift* ((y + 1) mod 4) instead of noise was named in 7 of 10
    drift, errors = train_three_sources(seed, corrupt_from=180)
    assert errors == [] and [s for _, s in drift] == ["2"]
    assert train_three_sources(seed, corrupt_from=None, steps=600) == ([], [])


# --- the loop's own per-step losses (keel.signals.source_losses), pooled per loss_block steps ----------------------
def step_losses(
    seed: int, *, steps: int = 520, shift_from: int | None = None, factor: float = 1.4, offset: float = 1.0
) -> list[Observation]:
    """A proxy-LM-like run, as the loop sees it every step: batch 16 drawn from three sources (~5 examples each),
    per-example losses with a relative noise of 0.27 (one batch's mean of a source: ~0.12, as measured on the proxy
    LM), a common decay; source "2" is ``offset`` times harder from the start, and ``factor`` times its loss from
    step ``shift_from`` on (the shuffled-bytes source: +36 % on its own, ~+45 % against the others). Each step
    carries the per-source means and counts `keel.signals.source_losses` gives."""
    rng = np.random.default_rng(seed)
    level = np.array([2.4, 2.5, 2.45 * offset])
    out = []
    for step in range(steps):
        source = rng.integers(0, 3, 16)
        scale = level * (1.0 + 1.5 * math.exp(-step / 60))
        if shift_from is not None and step >= shift_from:
            scale = scale * np.array([1.0, 1.0, factor])
        losses = scale[source] * (1.0 + 0.27 * rng.standard_normal(16))
        values: dict[str, float] = {}
        for s in np.unique(source):
            values[keys.per_param(keys.SOURCE_STEP_LOSS_PER_SOURCE, str(s))] = float(losses[source == s].mean())
            values[keys.per_param(keys.SOURCE_STEP_COUNT_PER_SOURCE, str(s))] = float((source == s).sum())
        out.append(Observation(step=step, values=values))
    return out


def _probe_only(observations: list[Observation], every: int = 10) -> list[Observation]:
    """What the probe alone sees: one batch's per-source loss every ``every`` steps."""
    return [
        Observation(
            step=o.step,
            values={
                keys.SOURCE_LOSS_PER_SOURCE + k[len(keys.SOURCE_STEP_LOSS_PER_SOURCE) :]: v
                for k, v in o.values.items()
                if k.startswith(keys.SOURCE_STEP_LOSS_PER_SOURCE)
            },
        )
        for o in observations
        if o.step % every == 0
    ]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_step_losses_pooled_per_block_name_a_40_percent_drift_that_one_batch_measurements_miss(seed):
    run = step_losses(seed, shift_from=300)
    named = _named(run)
    assert named and {s for _, s in named} == {"2"} and 300 <= named[0][0] <= 300 + 100, named
    assert _named(_probe_only(run)) == []  # ~5 examples a measurement: the same drift is within the noise


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_step_losses_name_nothing_on_a_healthy_run_nor_a_source_harder_from_the_start(seed):
    assert _named(step_losses(seed)) == []
    assert _named(step_losses(seed, offset=1.5)) == []


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_a_source_whose_loss_collapses_is_named_as_fallen_and_the_healthy_ones_are_not(seed):
    # byte-0x00 windows are learnt at once (2.4 -> 0.0004 on the proxy LM): trivially easy data is broken data
    det = SourceDriftDetector()
    found = [f for o in step_losses(seed, shift_from=300, factor=0.001) for f in det.update(o)]
    assert found and {f.evidence["source"] for f in found} == {"2"}
    assert found[0].evidence["direction"] == {"loss": "down"} and 300 <= found[0].step <= 400


def test_a_falling_gradient_norm_or_a_rising_cosine_is_not_named():
    # one-sided features: a source whose gradient shrinks, or agrees more with the rest, is being learnt
    obs = series(7, bad=2, bad_from=60, jump=-20.0, present=1.0, outliers=0.0)
    for o in obs:
        o.per_param.pop(keys.SOURCE_LOSS_PER_SOURCE, None)
    assert _named(obs) == []


def test_the_long_history_takes_a_value_only_once_it_left_the_short_window():
    from keel.detect.source_drift import _History

    h = _History()
    for i in range(30):
        h.add(0.01 * (i % 3), short_window=7, alpha=0.05)
    long_before = h.long
    for _ in range(7):  # a step change fills the short window ...
        h.add(5.0, short_window=7, alpha=0.05)
    assert h.short == 5.0 and h.long == pytest.approx(long_before, abs=0.05)  # ... and the long one saw none of it
    h.add(5.0, short_window=7, alpha=0.05)
    assert h.long > long_before  # now it does, Huber-clipped


def test_state_round_trip_mid_block_continues_identically():
    obs = step_losses(4, steps=380, shift_from=300)
    whole = SourceDriftDetector()
    expected = [[f.to_dict() for f in whole.update(o)] for o in obs]
    half = SourceDriftDetector()
    for o in obs[:305]:  # mid-block: five steps pooled
        half.update(o)
    resumed = SourceDriftDetector()
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    assert [[f.to_dict() for f in resumed.update(o)] for o in obs[305:]] == expected[305:] and any(expected)
