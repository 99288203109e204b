"""QAT oscillation detector: exact warning steps on share traces, hysteresis, the layer named, silence without the
key, and bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from keel._core import keys
from keel._core.observation import Observation
from keel.detect import QatOscillationConfig, QatOscillationDetector, default_detectors

LAYERS = ("blocks.0.attn.qkv", "blocks.0.mlp.fc")


def series(oscillate_from: int | None = None, n: int = 300, seed: int = 0) -> list[Observation]:
    """A share that warms up like the probe's EMA to ~0.15 (healthy), or climbs to ~0.6 from ``oscillate_from``;
    the per-layer family every 10 steps (log_every), the second layer the worse one."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    share = 0.15 * (1 - np.exp(-t / 80)) + 0.01 * rng.standard_normal(n)
    if oscillate_from is not None:
        share = share + np.where(t >= oscillate_from, 0.45 * (1 - np.exp(-(t - oscillate_from) / 20)), 0.0)
    share = np.clip(share, 0.0, 1.0)
    return [
        Observation(
            step=int(s),
            values={keys.QAT_OSCILLATION: float(x)},
            per_param={keys.QAT_OSCILLATION_PER_LAYER: (LAYERS, [x / 2, float(x)])} if s % 10 == 0 else {},
        )
        for s, x in zip(t, share, strict=True)
    ]


def alarms(det: QatOscillationDetector, observations: list[Observation]) -> list[tuple[int, str]]:
    return [(f.step, f.severity) for obs in observations for f in det.update(obs)]


def test_a_healthy_warm_up_of_the_share_raises_nothing() -> None:
    assert alarms(QatOscillationDetector(), series()) == []


def test_a_layer_oscillating_from_step_100_warns_once_after_patience_steps_above_the_level() -> None:
    observations = series(oscillate_from=100)
    above = [o.values[keys.QAT_OSCILLATION] >= 0.4 for o in observations]
    expected = next(s for s in range(19, len(above)) if all(above[s - 19 : s + 1]))  # 20 in a row, noise included
    det = QatOscillationDetector()
    found = [f for obs in observations for f in det.update(obs)]
    assert [(f.step, f.severity, f.kind) for f in found] == [(expected, "warning", "qat_oscillation")]
    assert found[0].evidence["onset_step"] == expected - 19 and 100 < expected < 160
    assert "CGA" in found[0].evidence["advice"][0]["action"]


def test_the_finding_names_the_layer_when_the_step_logs_the_family() -> None:
    det = QatOscillationDetector(patience=1)
    obs = Observation(
        step=10, values={keys.QAT_OSCILLATION: 0.7}, per_param={keys.QAT_OSCILLATION_PER_LAYER: (LAYERS, [0.2, 0.7])}
    )
    (finding,) = det.update(obs)
    assert finding.evidence["layer"] == "blocks.0.mlp.fc" and "blocks.0.mlp.fc" in finding.cause


def test_hovering_near_the_level_does_not_re_warn_until_the_share_falls_below_the_release() -> None:
    det = QatOscillationDetector(patience=2)
    trace = [0.5, 0.5, 0.5, 0.35, 0.5, 0.5, 0.5, 0.1, 0.5, 0.5]  # 0.35 ≥ 0.4·0.8: same episode; 0.1 closes it
    found = alarms(det, [Observation(step=s, values={keys.QAT_OSCILLATION: x}) for s, x in enumerate(trace)])
    assert found == [(1, "warning"), (9, "warning")]


def test_silent_without_its_key_or_on_non_finite_values() -> None:
    det = QatOscillationDetector(patience=1)
    assert det.update(Observation(step=0, values={keys.LOSS: 1.0})) == []
    assert det.update(Observation(step=1, values={keys.QAT_OSCILLATION: math.nan})) == []


def test_it_is_in_the_default_set() -> None:
    assert any(isinstance(d, QatOscillationDetector) for d in default_detectors())


@pytest.mark.parametrize(
    ("field", "value"), [("level", 0.0), ("level", 1.5), ("release", -1.0), ("patience", 0), ("patience", 2.5)]
)
def test_bad_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        QatOscillationConfig(**{field: value})  # type: ignore[arg-type]


SERIES = Path(__file__).with_name("data") / "qat_series.json"  # tests/detect/data/record_qat_series.py


def replay(run: str) -> tuple[dict[str, list], list[tuple[int, str]]]:
    """The recorded run and what a fresh detector finds on its share, step by step."""
    recorded = json.loads(SERIES.read_text())[run]
    observations = [
        Observation(step=s, values={keys.QAT_OSCILLATION: x})
        for s, x in zip(recorded["steps"], recorded["share"], strict=True)
    ]
    return recorded, alarms(QatOscillationDetector(), observations)


@pytest.mark.parametrize("run", ["qat_oscillation/0", "qat_oscillation/1", "qat_oscillation/2"])
def test_the_zoos_oscillating_qat_runs_are_named_at_the_live_runs_steps(run: str) -> None:
    recorded, found = replay(run)
    assert found == [(step, "warning") for step in recorded["findings"]] and len(found) == 1


@pytest.mark.parametrize("run", ["qat_healthy/0", "qat_healthy/1", "qat_healthy/2"])
def test_the_zoos_healthy_qat_runs_stay_silent_with_room_below_the_level(run: str) -> None:
    recorded, found = replay(run)
    assert found == [] and recorded["findings"] == []
    assert max(recorded["share"]) < 0.5 * QatOscillationConfig().level
