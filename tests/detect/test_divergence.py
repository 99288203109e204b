import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import Observation
from keel.detect.divergence import DivergenceConfig, DivergenceDetector


def _run(det, values):
    return [f for s, v in enumerate(values) for f in det.update(Observation(step=s, values={"loss": v}))]


def test_sustained_rise_warns_then_goes_critical_once_each():
    rng = np.random.default_rng(0)
    values = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(100)]
    values += [2.0 + 0.04 * i for i in range(1, 101)]  # slow divergence: 2 → 6
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found] == ["warning", "critical"]
    warn, crit = found
    # median of 9 passes 2.5 (25 %) at rise index ~17; +patience 10
    assert 120 <= warn.step <= 132
    assert crit.value >= 2 * crit.baseline * 0.98
    assert warn.evidence["onset_step"] < warn.step


def test_falling_and_noisy_loss_is_silent():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        values = [(2.0 + 3.0 * math.exp(-i / 100)) * (1 + 0.05 * rng.standard_normal()) for i in range(2000)]
        values[500] = 20.0  # one-batch outliers do not move a median
        values[1500] = float("nan")
        assert _run(DivergenceDetector(), values) == []


def test_episode_resets_after_recovery():
    values = [2.0] * 60 + [3.0] * 30 + [2.0] * 30 + [3.0] * 30
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found] == ["warning", "warning"]


def test_bad_config():
    with pytest.raises(ValueError, match="warn_excess"):
        DivergenceConfig(warn_excess=2.0, critical_excess=1.0)
    with pytest.raises(ValueError, match="patience"):
        DivergenceConfig(patience=0)


def test_state_round_trip():
    values = [2.0] * 60 + [5.0] * 40
    a = DivergenceDetector()
    _run(a, values[:70])
    b = DivergenceDetector()
    b.load_state_dict(a.state_dict())
    tail = list(enumerate(values))[70:]
    assert [f for s, v in tail for f in a.update(Observation(step=s, values={"loss": v}))] == [
        f for s, v in tail for f in b.update(Observation(step=s, values={"loss": v}))
    ]


# --- noisy but healthy runs: the run's own noise and epoch structure, not a fixed ratio ----------------------
def _noise(rng, n, scale, df):
    """Per-step noise in log units: Gaussian, or Student-t with ``df`` degrees of freedom (heavy tails)."""
    eps = rng.standard_normal(n) if df is None else rng.standard_t(df, n) / math.sqrt(df / (df - 2))
    return scale * eps


def _epochs(seed, *, epochs=6, per_epoch=60, start=2.0, end=0.1, scale=0.3, df=None):
    """A multi-epoch fine-tune: the level drops at each epoch boundary (log-linearly from ``start`` to ``end``)
    and each step's loss is the level times exp(noise): small batches of easy and hard examples."""
    rng = np.random.default_rng(seed)
    levels = np.repeat(start * (end / start) ** (np.arange(epochs) / (epochs - 1)), per_epoch)
    return (levels * np.exp(_noise(rng, len(levels), scale, df))).tolist()


@pytest.mark.parametrize("df", [None, 3])
@pytest.mark.parametrize("scale", [0.3, 0.5])
def test_small_batch_fine_tune_with_epoch_drops_is_silent(scale, df):
    # ±30-50 % per-step swings, heavy tails, five drops to 0.1: the run of the issue raised dozens of warnings
    for seed in range(8):
        found = _run(DivergenceDetector(), _epochs(seed, scale=scale, df=df))
        assert found == [], (seed, [(f.step, f.severity, f.evidence) for f in found])


def test_noisy_flat_run_is_silent_however_long():
    # the best median of a long noisy run is a lucky stretch; the level above it is ordinary noise
    for seed in range(4):
        rng = np.random.default_rng(seed)
        values = (0.5 * np.exp(_noise(rng, 5000, 0.3, 4))).tolist()
        assert _run(DivergenceDetector(), values) == []


def test_noisy_run_still_reports_a_real_rise():
    rng = np.random.default_rng(0)
    values = (1.0 * np.exp(_noise(rng, 600, 0.3, None))).tolist()
    values += (1.6 * np.exp(_noise(rng, 400, 0.3, None))).tolist()  # +60 % from step 600, in ±30 % noise
    found = _run(DivergenceDetector(), values)
    assert [f.severity for f in found] == ["warning"]
    assert 600 < found[0].step <= 600 + 150
    assert found[0].evidence["window"] > DivergenceConfig().short  # it needed more samples than a quiet run


_NOISE = st.sampled_from([None, 3, 5])  # Gaussian, or Student-t tails in log space


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.005, 0.5),
    df=_NOISE,
    shape=st.sampled_from(["flat", "falling", "epochs"]),
    n=st.integers(100, 1500),
)
def test_property_healthy_noise_processes_raise_nothing(seed, scale, df, shape, n):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    level = {
        "flat": np.full(n, 1.0),
        "falling": 0.1 + 2.0 * np.exp(-t / (n / 4)),
        "epochs": 2.0 * 0.05 ** (np.minimum(t // max(1, n // 5), 4) / 4),
    }[shape]
    values = (level * np.exp(_noise(rng, n, scale, df))).tolist()
    assert _run(DivergenceDetector(), values) == []


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), scale=st.floats(0.005, 0.5), df=st.sampled_from([None, 5]), k=st.floats(3.0, 10.0)
)
def test_property_a_level_shift_of_k_noise_units_is_found(seed, scale, df, k):
    # a lasting rise of max(60 %, k noise units) after 400 healthy steps: found, later the noisier the run
    rng = np.random.default_rng(seed)
    shift = max(math.log(1.6), k * scale)
    values = np.exp(_noise(rng, 800, scale, df))
    values[400:] *= math.exp(shift)
    found = _run(DivergenceDetector(), values.tolist())
    assert found and found[0].step >= 400, [(f.step, f.severity) for f in found]
    assert found[0].step - 400 <= (25 if scale <= 0.05 else 200)
    if shift >= math.log(2.0) + 0.2:  # well past twice the best: critical within the same bound
        assert any(f.severity == "critical" and f.step - 400 <= 200 for f in found)


@pytest.mark.xfail(strict=True, reason="h26 G5: a rare false alarm on flat iid t5 noise (0 in 2,700 runs of 400 steps)")
def test_the_known_iid_draw_that_warns_before_any_shift():
    # the level-shift property at 2,000 examples drew this: the best (0.84, set at step 18) lies ~6.5 of its standard
    # errors below the process's medians (0.95-1.0), and a run of high values at 138-147 warns; pinned so a fix shows
    values = np.exp(_noise(np.random.default_rng(31992278), 400, 0.125, 5))
    assert _run(DivergenceDetector(), values.tolist()) == []


@pytest.mark.xfail(strict=True, reason="h27: the property below drew a second rare false alarm (flat iid t3 noise)")
def test_a_second_known_iid_draw_that_warns_before_any_shift():
    # session 15's local runs of the property (not derandomized) drew this: a warning at step 376 of 377 (median 1.04,
    # best 0.83); the same class as h26 G5, pinned so that a fix shows
    values = np.exp(_noise(np.random.default_rng(173155), 377, 0.15234375, 3))
    assert _run(DivergenceDetector(), values.tolist()) == []


def test_a_blow_up_in_a_noisy_run_does_not_wait_for_the_wide_median():
    rng = np.random.default_rng(1)
    values = np.exp(_noise(rng, 700, 0.3, None))
    values[500:] *= 3.0  # the loss triples: the last `short` steps show it long before a 200-step median moves
    found = _run(DivergenceDetector(), values.tolist())
    assert found and all(f.step >= 500 for f in found)
    assert found[0].evidence["window"] == DivergenceConfig().short and found[0].step - 500 <= 20
    assert found[0].severity == "critical"


def test_state_round_trip_in_a_noisy_run_continues_identically():
    rng = np.random.default_rng(3)
    values = (np.exp(_noise(rng, 1200, 0.3, 3)) * np.where(np.arange(1200) < 700, 1.0, 2.5)).tolist()
    a = DivergenceDetector()
    _run(a, values[:650])
    assert a.state_dict()["size"] > DivergenceConfig().short  # mid-run, with a noise-sized window
    b = DivergenceDetector()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    rest = list(enumerate(values))[650:]
    fa = [f for s, v in rest for f in a.update(Observation(step=s, values={"loss": v}))]
    fb = [f for s, v in rest for f in b.update(Observation(step=s, values={"loss": v}))]
    assert fa == fb and [f.severity for f in fa] == ["critical"]
    assert a.state_dict() == b.state_dict()


@pytest.mark.timeout(60)  # a hang guard: the ladder 3 -> int(3 * 1.25) | 1 = 3 looped forever
@pytest.mark.parametrize("short", [1, 2, 3])
def test_a_short_window_under_four_still_grows_with_the_noise(short):
    rng = np.random.default_rng(0)
    det = DivergenceDetector(DivergenceConfig(short=short, window=31, min_history=short))
    _run(det, np.exp(_noise(rng, 300, 0.3, None)).tolist())
    assert det.state_dict()["size"] == 31  # ±30 % noise asks for the widest window allowed


def test_a_loss_of_both_signs_in_its_window_is_not_judged_one_of_one_sign_is():
    # a policy-gradient surrogate (REINFORCE's -log_prob * return: near 0 of either sign, growing in size as episodes
    # lengthen): a healthy pytorch/examples reinforce.py run was rolled back three times, then aborted (helper D)
    rng = np.random.default_rng(2)
    surrogate = rng.standard_normal(400) * np.linspace(0.3, 3.0, 400)
    det = DivergenceDetector()
    assert [f for s, v in enumerate(surrogate) for f in det.update(Observation(step=s, values={"loss": v}))] == []
    assert DivergenceDetector().scan(np.arange(400), surrogate) == []
    # a loss that stays negative is still judged (a VAE's summed Gaussian NLL, -34000 at its best, climbing back)
    vae = np.concatenate([np.full(120, -34000.0), np.full(40, -12000.0)]) + rng.standard_normal(160) * 50
    det = DivergenceDetector()
    found = [f for s, v in enumerate(vae) for f in det.update(Observation(step=s, values={"loss": v}))]
    assert found and found[0].kind == "divergence" and 120 <= found[0].step < 140
    assert DivergenceDetector().scan(np.arange(160), vae) == found


def test_a_window_holding_a_negative_value_is_scanned_as_update_goes_when_the_next_piece_has_none():
    # hypothesis' example (test_fast_paths): losses ~1e-3 with two small negative values at 177-178, the log read in
    # two pieces cut at 179: scan's bulk path set a best level from the second piece alone (the negatives were only in
    # the window, not in its input), which update never sets while its window holds both signs
    values = 1e-3 * np.exp(0.3 * np.random.default_rng(0).standard_normal(330))
    values[177:179] = [-3.4e-4, -4.4e-5]
    whole = DivergenceDetector()
    found = [f for s, v in enumerate(values) for f in whole.update(Observation(step=s, values={"loss": float(v)}))]
    pieces = DivergenceDetector()
    found_in_pieces = pieces.scan(np.arange(179), values[:179]) + pieces.scan(np.arange(179, 330), values[179:])
    assert found_in_pieces == found
    assert pieces.state_dict() == whole.state_dict()


# Losses of a minGPT-shaped run (karpathy/minGPT Trainer.run: AdamW, clip 1.0, no scheduler; the tiny GPT of
# tests/integrations/test_outside_mingpt.py on argparse.py's bytes), rounded to 0.01: one update at 100x the LR at step
# 30. The loss stays 1.5-1.7x its level before for 8 steps, 4 step-noise z each (no spike), then comes back down.
MINGPT_HEALTHY = [
    float(v)
    for v in (
        "5.57 5.32 5.32 4.96 5.01 4.69 4.52 4.9 3.92 4.0 3.94 3.25 3.77 3.69 3.36 3.83 3.75 3.69 3.04 3.49 "
        "3.35 3.53 3.13 3.91 4.08 3.24 3.06 3.7 3.33 3.28 2.63 3.16 3.32 2.8 2.9 3.5 2.61 2.97 2.99 3.24 3.12 "
        "3.07 3.02 3.57 3.98 3.42 2.65 2.89 2.77 2.08 2.93 2.58 3.1 2.47 3.32 2.2 2.11 3.47 2.69 2.45"
    ).split()
]
MINGPT_LR_SPIKE_AT_30 = MINGPT_HEALTHY[:31] + [
    float(v)
    for v in (
        "5.55 5.32 5.75 5.68 5.58 5.43 5.82 4.92 4.29 4.99 4.76 4.19 4.62 4.47 4.06 3.55 3.29 3.17 2.52 3.28 "
        "2.83 3.34 2.8 3.76 2.25 2.22 3.7 2.86 2.57"
    ).split()
]


def test_a_lasting_rise_in_a_runs_first_fifty_steps_is_named():
    # min_history was 50: the run above got no finding at all (it is back down by step 50)
    found = _run(DivergenceDetector(), MINGPT_LR_SPIKE_AT_30)
    assert [(f.step, f.severity) for f in found] == [(44, "warning")]
    assert 31 <= found[0].evidence["onset_step"] <= 36
    assert _run(DivergenceDetector(), MINGPT_HEALTHY) == []
