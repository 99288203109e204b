"""The LoRA blow-up detector: exact steps on recorded proxy traces and synthetic series, silence on healthy growth
from B = 0, the projection and the module it names, hostile values and its config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from keel._core import Observation, keys
from keel.detect import LoraBlowupConfig, LoraBlowupDetector

# ‖ΔW‖/‖W_base‖ (max over adapters) and the loss per step of real runs (LoRA probe, seed 0): peft LoRA r 8 / α 16 on
# the pre-trained tiny proxy at LR 3e-3 (healthy), 5e-2 warmed up over 60 steps, 1e-1 over 10, 3e-2 over 60; and
# the qlora_finetune scenario (keel's own rank-32 adapters, α 128: the fastest healthy growth the zoo has)
TRACES = json.loads((Path(__file__).parent / "data" / "lora_ratio_traces.json").read_text())


def series(n: int = 200, *, race_from: int | None = None, seed: int = 0) -> list[Observation]:
    """A healthy adapter's ratio — quadratic through a 20-step warm-up, then linear, then levelling off, with noise —
    and, with ``race_from``, one that races from that step at 8 % of the base norm per step, ×1.05 faster each."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    healthy = 0.4 * (1 - np.exp(-(np.minimum(t, 20) ** 2) / 400 - np.maximum(t - 20, 0) / 60))
    ratio = healthy * np.exp(0.02 * rng.standard_normal(n))
    if race_from is not None:
        k = np.maximum(t - race_from, 0)
        ratio = ratio + 0.08 * (1.05**k - 1) / 0.05
    return [
        Observation(step=int(s), values={keys.LORA_DELTA_RATIO_MAX: float(v)}) for s, v in zip(t, ratio, strict=True)
    ]


def _found(observations: list[Observation], det: LoraBlowupDetector | None = None) -> list[tuple[int, str]]:
    det = det or LoraBlowupDetector()
    return [(f.step, f.severity) for o in observations for f in det.update(o)]


def _trace(name: str) -> list[Observation]:
    return [Observation(step=s, values={keys.LORA_DELTA_RATIO_MAX: v}) for s, v in enumerate(TRACES[name]["ratio"])]


@pytest.mark.parametrize("name", ["qlora_finetune_seed0", "peft_lr3e-3_seed0"])
def test_healthy_fine_tunes_whose_adapters_grow_from_zero_raise_nothing(name):
    assert TRACES[name]["ratio"][0] == 0.0  # B starts at zero
    assert max(TRACES[name]["ratio"]) > 0.5  # and the adapters grew a lot: qlora's to 1.3 times their base weight
    assert _found(_trace(name)) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("peft_lr5e-2_warmup60_seed0", [(27, "warning"), (54, "critical")]),
        ("peft_lr1e-1_warmup10_seed0", [(3, "warning"), (10, "critical")]),
        ("peft_lr3e-2_warmup60_seed0", [(95, "critical")]),  # slow: past 2× by step 84, fast only from 95
    ],
)
def test_too_high_learning_rates_are_found_at_these_steps(name, expected):
    assert _found(_trace(name)) == expected


def test_the_warning_comes_before_the_loss_leaves_its_level():
    trace = TRACES["peft_lr5e-2_warmup60_seed0"]
    loss = np.array(trace["loss"])
    running = np.array([np.median(loss[max(0, i - 8) : i + 1]) for i in range(len(loss))])
    broken = int(np.argmax(running > 1.3 * np.median(loss[:20])))  # the running median 30 % above its start
    (warning, _), _ = _found(_trace("peft_lr5e-2_warmup60_seed0"))
    assert 27 == warning < broken - 10, broken


def test_synthetic_healthy_growth_is_silent_and_a_race_is_found_with_its_projection():
    for seed in range(5):
        assert _found(series(seed=seed)) == []
    det = LoraBlowupDetector()
    observations = series(race_from=100)
    for o in observations[100:]:
        o.per_param[keys.LORA_DELTA_NORM_PER_MODULE] = (("blocks.0.q", "blocks.1.v"), [0.3, 2.0])
    findings = [f for o in observations for f in det.update(o)]
    assert [(f.step, f.severity) for f in findings] == [(104, "warning"), (115, "critical")]  # racing from 101
    warning = findings[0]
    assert warning.kind == "lora_blowup"
    assert warning.evidence["largest_delta_module"] == "blocks.1.v"
    assert 104 < warning.evidence["projected_critical_step"] <= 120  # it reached 2.0 at step 115
    assert "ALLoRA" in warning.advice or "learning rate" in warning.advice


def test_a_non_finite_ratio_is_critical_once_per_run_of_them():
    values = [0.0, 0.1, math.nan, math.inf, 0.2, math.nan]
    found = _found([Observation(step=s, values={keys.LORA_DELTA_RATIO_MAX: v}) for s, v in enumerate(values)])
    assert found == [(2, "critical"), (5, "critical")]


def test_a_model_without_adapters_is_never_read():
    det = LoraBlowupDetector()
    assert _found([Observation(step=s, values={keys.LOSS: 2.0}) for s in range(50)], det) == []
    assert det.state_dict()["trend"]["points"] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("window", 2),
        ("window", 4.5),
        ("patience", 0),
        ("min_level", 0.0),
        ("fast_rate", -0.1),
        ("critical_level", math.inf),
        ("critical_level", 0.05),  # below min_level
        ("signal", 3),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        LoraBlowupConfig(**{field: value})
