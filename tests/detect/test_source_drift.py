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
) -> list[Observation]:
    """Per-source loss, gradient norm and cosine of a healthy run with heterogeneous sources: each its own level
    and noise, a common decay, a slow differential drift of up to ``trend`` noise units over the run, one-batch
    outliers (up to 10 noise units), sources missing from some batches. Source ``bad``'s values move ``jump``
    noise units the worse way (loss and norm up, cosine down) from measurement ``bad_from`` on — in units of the
    noisiest source's relative noise, since a source is judged against the others' noise as well as its own."""
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
