"""The spike detector's first steps and its level-shift test, on series taken from runs nobody here wrote.

- An HF run_clm fine-tune with its LR ×1000 from step 10 (h23 H12): the loss goes 4.5 → 20 → 40 → 156 and the
  gradient norm 2.6 → 82 while the detector was still short of its 20-value baseline; it said nothing until step 21.
- timm's train.py at batch 8 with an LR ×100 for one update (h23 T): the loss rises 0.75 → 6.7 and stays at 3–5 for
  19 steps, every step within the run's ±100 % noise (3 robust z); nothing flagged it.
- Healthy first steps that must stay silent: a loss falling fast, a gradient norm largest at step 0, a norm growing
  from a zero-initialised layer, a restart that shifts the norm 2.7× (CPM-Ant's daily log).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import keel
from keel._core import Observation
from keel.detect.spike import GRAD_NORM_DEFAULTS, SpikeConfig, SpikeDetector
from keel.doctor import examine_log

# HF run_clm (tiny GPT-2 from a config, AdamW 1e-3, cosine, warm-up 3), LR ×1000 from step 10: keel's store, steps 0-23
H12_LOSS = [5.34, 5.339, 5.204, 5.154, 4.992, 4.882, 4.848, 4.779, 4.696, 4.594, 4.533, 20.434, 40.061, 43.291,
            46.611, 156.373, 36.761, 75.561, 83.393, 62.718, 49.303, 125.085, 126.175, 123.592]  # fmt: skip
H12_GRAD = [3.245, 3.197, 3.594, 2.804, 2.662, 2.808, 2.498, 2.386, 2.473, 2.653, 2.639, 15.756, 81.883, 15.755,
            11.757, 64.882, 11.916, 14.78, 17.801, 17.046, 22.587, 85.928, 88.996, 84.16]  # fmt: skip
# timm train.py, resnet10t, batch 8, LR ×100 for update 35 (keel's store of the run)
TIMM_LOSS = [1.022, 1.226, 1.15, 1.419, 0.816, 1.32, 1.119, 0.951, 1.451, 1.317, 0.743, 0.568, 0.458, 0.358, 0.965,
             0.446, 0.362, 0.409, 0.348, 1.279, 0.383, 1.278, 0.379, 0.324, 0.601, 0.803, 0.421, 0.833, 0.355, 0.622,
             0.394, 0.32, 0.318, 0.344, 0.749, 6.708, 5.514, 3.245, 4.854, 4.211, 2.813, 5.308, 2.686, 2.779, 2.676,
             3.029, 3.009, 1.149, 4.078, 1.853, 4.025, 2.197, 1.811, 2.555]  # fmt: skip
# healthy first steps (shared/data/realruns): llm.c GPT-2 124M (norm largest at step 0), modded-nanogpt 1.5B (the
# first loss 2.4× the next), CPM-Ant 10B's daily averages (a restart moves the norm 0.27 → 0.74, a config change 2.28)
LLMC_LOSS = [11.0116, 10.9586, 10.8579, 10.7118, 10.5568, 10.4323, 10.2889, 10.2033, 10.1044, 9.9807, 9.9571, 9.8549,
             9.7936, 9.7636, 9.7126, 9.6622, 9.6609, 9.623, 9.6122, 9.5886, 9.5682]  # fmt: skip
LLMC_GRAD = [14.96, 15.18, 14.49, 13.14, 10.79, 8.45, 7.30, 6.10, 5.24, 4.63, 3.82, 3.41, 3.05, 2.70, 2.51, 2.37,
             2.22, 2.20, 2.17, 2.22, 2.17]  # fmt: skip
MNG_LOSS = [22.6211, 9.5956, 9.4517, 9.3657, 9.445, 9.2422, 9.2074, 9.2281, 9.1502, 8.9973, 8.9949, 9.0298, 8.7964,
            8.989, 8.637, 8.6142, 8.5561, 8.5434, 8.6723, 8.6549, 8.1789]  # fmt: skip
CPM_GRAD = [0.56, 0.34, 0.30, 0.29, 0.28, 0.27, 0.27, 0.27, 0.74, 0.82, 0.86, 2.28, 0.71, 0.68, 0.70, 0.77, 0.75,
            0.75, 0.76, 0.79, 0.81]  # fmt: skip


def _update(values, key="loss"):
    det = SpikeDetector(signal=key)
    return [f for step, v in enumerate(values) for f in det.update(Observation(step=step, values={key: v}))]


def _scan(values, key="loss"):
    return SpikeDetector(signal=key).scan(np.arange(len(values)), np.asarray(values, dtype=float))


def _alarms(found):
    return [(f.step, f.severity) for f in found if f.severity != "info"]


# --- the first steps ---------------------------------------------------------------------------------------------


def test_an_lr_far_too_high_from_step_10_is_critical_at_its_first_step_not_at_step_21():
    loss = _update(H12_LOSS)
    assert (loss[0].step, loss[0].severity) == (11, "critical")  # 20.4 = 4.2× the median of the 11 before
    assert loss[0].evidence["warm_up"] == 11 and "the median of its first 11 values" in loss[0].cause
    assert "learning rate far too high" in loss[0].cause
    grad = _update(H12_GRAD, "grad/norm")
    assert (grad[0].step, grad[0].severity) == (12, "critical")  # 81.9 = 30× (15.8 = 5.9× at step 11 is not 10×)


@pytest.mark.parametrize(
    ("values", "key"),
    [(LLMC_LOSS, "loss"), (LLMC_GRAD, "grad/norm"), (MNG_LOSS, "loss"), (CPM_GRAD, "grad/norm")],
    ids=["llmc-loss", "llmc-grad-largest-at-step-0", "mng-first-loss-2.4x", "cpm-restart-shifts-grad"],
)
def test_healthy_first_steps_of_real_runs_raise_nothing(values, key):
    assert _update(values, key) == []
    assert _scan(values, key) == []


@pytest.mark.parametrize("key", ["loss", "grad/norm"])
def test_a_norm_growing_from_a_zero_initialised_layer_or_under_a_warm_up_ramp_is_a_trend_not_a_spike(key):
    growing = [1e-3 * 1.8**i for i in range(20)]  # ×1.8 per step: a step along it is a few robust z of the trend
    ramp = [5.0 * (1 + 0.1 * min(i, 10)) for i in range(20)]  # a loss rising 2× while the LR warms up
    assert _update(growing, key) == [] and _update(ramp, key) == []


def test_the_first_warmup_points_values_are_never_judged():
    assert _update([2.0, 2.0, 2.0, 2.0, 2000.0]) == []  # four values: too few to judge the fifth
    assert _alarms(_update([2.0, 2.0, 2.0, 2.0, 2.0, 2000.0])) == [(5, "critical")]


def test_a_moderate_early_jump_is_left_to_the_baseline():
    # 3× a flat start: below the first steps' 4× (critical with a baseline: the armed detector's 2×)
    assert _update([2.0 + 0.01 * (i % 3) for i in range(10)] + [6.0]) == []


def test_non_finite_zero_and_missing_values_in_the_first_steps():
    values = [5.0, math.nan, 5.1, math.inf, 4.9, -math.inf, 5.0, 5.05, 4.95, 60.0]
    found = _update(values)
    assert [(f.step, f.severity) for f in found] == [(9, "critical")]  # five finite values before it
    assert _scan(values) == found
    # a loss that reaches 0 leaves log space (`log_scale=None`); the first-steps rule is for log space only
    assert _update([5.0, 5.1, 0.0, 4.9, 5.0, 5.05, 4.95, 5.0, 60.0]) == []
    # a gradient norm of 0 (nothing reached the weights) is not a value in log space: skipped, not judged
    assert _alarms(_update([2.0, 0.0, 2.1, 1.9, 0.0, 2.0, 2.05, 1.95, 200.0], "grad/norm")) == [(8, "critical")]
    assert _update([5.0] * 8 + [None] * 3 + [5.0]) == []


def test_critical_above_agrees_with_the_first_steps_rule():
    det = SpikeDetector(signal="loss")
    for step, v in enumerate(H12_LOSS[:11]):
        det.update(Observation(step=step, values={"loss": v}))
    limit = det.critical_above(11)
    assert limit == pytest.approx(4.0 * 4.882)  # four times the median of the 11 values so far
    assert [f.severity for f in det.update(Observation(step=11, values={"loss": limit * 1.001}))] == ["critical"]


@settings(max_examples=30, deadline=None)
@given(
    start=st.floats(1e-4, 1e4),
    steps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=120),
    key=st.sampled_from(["loss", "grad/norm"]),
)
def test_property_a_series_that_never_rises_raises_nothing(start, steps, key):
    values = (start * np.exp(-np.cumsum([0.0, *steps]))).tolist()  # non-increasing, positive
    assert _update(values, key) == []
    assert _scan(values, key) == []


# --- a lasting level shift within the noise -------------------------------------------------------------------------


def test_a_lasting_9x_rise_in_a_noisy_small_batch_run_is_a_warning_then_critical():
    found = _update(TIMM_LOSS)
    # 8 steps after the LR ×100 at 35; critical 5 steps later, the level still there (test_lasting_level_shift.py)
    assert [(f.step, f.severity) for f in found] == [(43, "warning"), (48, "critical")]
    shift = found[0]
    assert shift.evidence["level_shift"] is True and shift.evidence["z"] >= 5.0
    assert 5.0 < shift.evidence["ratio"] < 8.0  # the median of 35-43 over the median of steps 0-34
    assert shift.evidence["onset_step"] == 33  # the oldest step of the first span that was a shift: before 35
    assert "within the run's noise" in shift.cause
    assert _scan(TIMM_LOSS) == found


def test_the_level_shift_is_reported_once_until_the_level_comes_back():
    rng = np.random.default_rng(0)
    values = np.exp(0.5 * rng.standard_normal(400))  # ±50 % per step: 10× is 4.6 robust z, never a spike
    values[100:160] *= 10.0  # a shift lasting 60 steps, then back; then again
    values[300:360] *= 10.0
    shifts = [(f.step, f.severity) for f in _update(values.tolist()) if f.evidence.get("level_shift")]
    (w1, _), (c1, _), (w2, _), (c2, _) = shifts  # each: its warning, and critical 5 steps on (it lasted)
    assert [severity for _, severity in shifts] == ["warning", "critical"] * 2
    assert 100 < w1 < 115 and c1 == w1 + 5 and 300 < w2 < 315 and c2 == w2 + 5


def test_a_gradient_norm_that_rises_and_stays_up_is_no_level_shift_unless_asked():
    # a healthy run's gradient norm rises on its own (pytorch/examples' vae, whose summed loss grows 150x in size:
    # 4.7x at step 44; the end of an LLM run under a decaying LR): the norm's level-shift test is off by default
    rng = np.random.default_rng(3)
    values = np.exp(0.5 * rng.standard_normal(200)) * np.where(np.arange(200) < 40, 1.0, 6.0)
    assert [f for f in _update(values.tolist(), "grad/norm") if f.evidence.get("level_shift")] == []
    det = SpikeDetector(
        SpikeConfig(signal="grad/norm", **(GRAD_NORM_DEFAULTS | {"shift_span": 9, "shift_excess": 3.0}))
    )
    shifts = [f for step, v in enumerate(values) for f in det.update(Observation(step=step, values={"grad/norm": v}))]
    assert [f.step for f in shifts if f.evidence.get("level_shift")][:1] == [47]  # 3 steps after the median moved


@pytest.mark.parametrize("seed", range(6))
def test_noisy_healthy_runs_and_one_batch_outliers_are_no_level_shift(seed):
    rng = np.random.default_rng(seed)
    values = 0.6 * np.exp(0.7 * rng.standard_normal(1500)) * (1 + np.exp(-np.arange(1500) / 300))
    values[rng.integers(100, 1500, 20)] *= 20.0  # one-batch outliers
    assert [f for f in _update(values.tolist()) if f.evidence.get("level_shift")] == []


def test_a_level_shift_in_a_long_run_is_found_by_scan_as_by_update():
    rng = np.random.default_rng(3)
    values = np.exp(0.5 * rng.standard_normal(3000))
    values[2500:] *= 10.0
    found = _update(values.tolist())
    assert [f.step for f in found if f.severity == "warning"] == [2506]  # 5 of 9 shifted at 2504, 3 steps in a row
    assert _scan(values.tolist()) == found


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sigma=st.floats(0.05, 0.9),
    shifts=st.lists(st.tuples(st.integers(0, 900), st.integers(5, 120), st.floats(1.5, 12.0)), max_size=3),
    key=st.sampled_from(["loss", "grad/norm"]),
)
def test_property_scan_equals_update_through_level_shifts(seed, sigma, shifts, key):
    values = np.exp(sigma * np.random.default_rng(seed).standard_normal(1000))
    for at, length, factor in shifts:
        values[at : at + length] *= factor
    det, again = SpikeDetector(signal=key), SpikeDetector(signal=key)
    by_step = [f for step, v in enumerate(values.tolist()) for f in det.update(Observation(step=step, values={key: v}))]
    assert again.scan(np.arange(len(values)), values) == by_step
    assert again.state_dict() == det.state_dict()


def test_state_round_trip_keeps_a_level_shift_under_way():
    det, again = SpikeDetector(signal="loss"), SpikeDetector(signal="loss")
    for step, v in enumerate(TIMM_LOSS[:42]):
        det.update(Observation(step=step, values={"loss": v}))
    again.load_state_dict(det.state_dict())
    rest = [Observation(step=s, values={"loss": v}) for s, v in enumerate(TIMM_LOSS[42:], start=42)]
    assert [f for o in rest for f in det.update(o)] == [f for o in rest for f in again.update(o)] != []


# --- keel doctor on a short log: the same detectors, the same rules ---------------------------------------------------


def _csv(tmp_path, loss, grad=None):
    rows = ["step,loss,grad_norm"] + [f"{step},{v},{'' if grad is None else grad[step]}" for step, v in enumerate(loss)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_doctor_on_a_24_step_log_finds_the_lr_blow_up_at_its_first_step(tmp_path):
    result = examine_log(_csv(tmp_path, H12_LOSS, H12_GRAD))
    first = result.at_least("warning")[0]
    assert (first.step, first.kind, first.severity) == (11, "loss_spike", "critical")


def test_doctor_on_a_54_step_noisy_log_finds_the_lasting_rise(tmp_path):
    result = examine_log(_csv(tmp_path, TIMM_LOSS))
    found = [(f.step, f.kind, f.severity) for f in result.at_least("warning")]
    assert found == [(43, "loss_spike", "warning"), (48, "loss_spike", "critical")]  # it lasted: the weights


# --- end to end: a Guard on a tiny model whose LR is 1000× too high from step 5 -------------------------------------


def _train(fault_at):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=data), torch.randint(0, 4, (256,), generator=data)
    guard = keel.Guard(model, optimizer, policy="observe")
    for step in range(14):
        if step == fault_at:
            for group in optimizer.param_groups:
                group["lr"] *= 1000
        batch = torch.randint(0, 256, (32,), generator=data)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()
    return [(f.step, f.kind, f.severity) for f in guard.findings if f.severity != "info"]


def test_a_guard_flags_an_lr_1000x_too_high_from_step_5_within_two_steps():
    found = _train(fault_at=5)
    # the LR itself at its first step (keel.detect.lr_surge; the loop keeps it, so after three steps it is taken as
    # meant), then the loss 1.4 → 5.5 → 13.2 it causes
    assert [f for f in found if f[1] == "lr_surge"] == [(s, "lr_surge", "critical") for s in (5, 6, 7)] + [
        (8, "lr_surge", "warning")
    ]
    assert [f for f in found if f[1] != "lr_surge"][0] == (7, "loss_spike", "critical")
    assert _train(fault_at=None) == []
