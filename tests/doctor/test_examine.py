"""The detection driver: same findings as the detectors themselves, sparse logs, restarts, gaps, merging."""

import math

import numpy as np
import pytest

from keel._core import Observation
from keel.detect import DivergenceDetector, SpikeDetector, default_detectors
from keel.detect.divergence import DivergenceConfig
from keel.doctor import RawLog, examine, examine_log


def _noisy(n, level=2.0, rel=0.02, seed=0):
    rng = np.random.default_rng(seed)
    return [level * (1 + rel * rng.standard_normal()) for _ in range(n)]


def _log(steps, losses, **extra_columns):
    records = []
    for i, (s, v) in enumerate(zip(steps, losses, strict=True)):
        values = {"loss": v}
        for name, column in extra_columns.items():
            values[name] = column[i]
        records.append((s, values))
    return RawLog(source="test", format="csv", records=records)


def _key(findings):
    return [(f.step, f.kind, f.severity) for f in findings]


def test_a_spike_is_found_at_its_step_exactly_as_the_detector_finds_it(tmp_path):
    losses = _noisy(200)
    losses[120] = 6.0
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in enumerate(losses)))
    result = examine_log(p)
    det = SpikeDetector(signal="loss")
    direct = [f for s, v in enumerate(losses) for f in det.update(Observation(step=s, values={"loss": v}))]
    assert _key(result.findings) == _key(direct) == [(120, "loss_spike", "critical")]
    assert result.findings[0].baseline == pytest.approx(2.0, rel=0.02)
    assert result.summary["stride"] == 1
    assert result.summary["counts"] == {"info": 0, "warning": 0, "critical": 1}


def test_a_clean_log_has_no_findings_above_info():
    steps = list(range(0, 3000))
    losses = [
        (2.0 + 3.0 * math.exp(-s / 300)) * (1 + 0.02 * e)
        for s, e in zip(steps, np.random.default_rng(1).standard_normal(len(steps)), strict=True)
    ]
    result = examine(_log(steps, losses))
    assert result.at_least("warning") == []


def test_sparse_log_scales_only_the_divergence_warm_up():
    # Logged every 50 steps: 12 flat points, then a steady rise. Unscaled, the divergence detector would
    # need 50 observations (2,500 steps) before it could say anything; the log has 40.
    steps = [50 * i for i in range(40)]
    losses = _noisy(12, rel=0.01) + [2.0 + 0.15 * i for i in range(1, 29)]
    result = examine(_log(steps, losses))
    assert result.summary["stride"] == 50
    readiness = {d["kind"]: d for d in result.summary["detectors"] if "needs" in d}
    assert readiness["divergence"]["needs"] == 9  # max(short=9, ceil(50 / 50))
    assert readiness["loss_spike"]["needs"] == 20  # a sample count: unchanged
    divergence = [f for f in result.findings if f.kind == "divergence"]
    assert [f.severity for f in divergence] == ["warning", "critical"]
    unscaled = DivergenceDetector(DivergenceConfig(min_history=50))  # (the default was 50 steps until h26 G)
    assert [
        f for s, v in zip(steps, losses, strict=True) for f in unscaled.update(Observation(step=s, values={"loss": v}))
    ] == []


def test_sparse_log_keeps_patience_in_observations():
    # One elevated logged point among sparse ones is still a one-off: info, not a warning.
    steps = [100 * i for i in range(60)]
    losses = _noisy(60, rel=0.01)
    losses[40] = 2.6
    result = examine(_log(steps, losses))
    assert _key(result.findings) == [(4000, "loss_spike", "info")]


def test_restart_rewinds_the_detectors_to_the_repeated_step():
    rng_losses = _noisy(400, rel=0.02, seed=3)
    first = list(range(0, 330))
    first_losses = rng_losses[:300] + [2.0 + 0.2 * i for i in range(1, 31)]  # diverges from step 300
    resumed = list(range(280, 400))  # resumed from a checkpoint at step 280, healthy again
    resumed_losses = rng_losses[280:400]
    log = _log(first + resumed, first_losses + resumed_losses)
    result = examine(log)
    assert result.summary["restarts"] == {"count": 1, "listed": [{"step": 280, "after_step": 329}]}
    before = [f for f in result.findings if "segment" not in f.evidence]
    after = [f for f in result.findings if f.evidence.get("segment") == 1]
    assert any(f.kind == "divergence" for f in before)
    # The resumed stretch is judged from the state at step 280, as if the diverged stretch never happened.
    clean = examine(_log(first[:280] + resumed, first_losses[:280] + resumed_losses))
    assert _key(after) == _key([f for f in clean.findings if f.step >= 280])
    assert all(f.severity == "info" for f in after)


def test_restart_far_back_uses_detector_checkpoints():
    # Longer than several checkpoint intervals (256 observations), restart deep in the history.
    losses = _noisy(1500, rel=0.02, seed=4)
    losses[1200] = 9.0
    log = _log(list(range(1300)) + list(range(700, 1500)), losses[:1300] + losses[700:1500])
    result = examine(log)
    clean = examine(_log(list(range(1500)), losses))
    assert _key(result.findings) == _key(clean.findings) + [(1200, "loss_spike", "critical")]
    assert [f.evidence.get("segment") for f in result.findings][-1] == 1


def test_gaps_and_same_step_merging_are_reported():
    log = RawLog(
        source="t",
        format="jsonl",
        records=[
            (0, {"loss": 2.0, "epoch": 0.0}),
            (0, {"eval_loss": 2.1, "epoch": 0.0}),
            (1, {"loss": 2.0}),
            (2, {"loss": 2.0}),
            (100, {"loss": 2.0}),
            (101, {"loss": 2.0}),
        ],
    )
    result = examine(log)
    assert result.summary["observations"] == 5 and result.summary["restarts"]["count"] == 0
    assert result.summary["gaps"] == {"count": 1, "listed": [{"after_step": 2, "next_step": 100}]}
    assert any("merged" in n for n in result.summary["notes"])


def test_non_finite_loss_and_grad_norm_are_critical():
    losses = _noisy(30)
    grads = [1.0] * 30
    losses[10] = math.nan
    grads[20] = math.inf
    result = examine(_log(list(range(30)), losses, grad_norm=grads))
    assert _key(result.at_least("warning")) == [(10, "non_finite", "critical")]
    # the finite loss after step 20 shows its update was skipped (keel.doctor.overflows)
    assert (20, "loss_scale_overflow", "info") in _key(result.findings)


def test_detector_factory_is_used_and_called_fresh_on_restart():
    made = []

    def factory():
        made.append(1)
        return default_detectors()

    examine(_log([0, 1, 2, 1, 2], [2.0] * 5), detectors=factory)
    assert len(made) == 3  # the run, the restart, the readiness summary


def test_a_recorded_rollback_rewinds_the_detectors_like_the_guard():
    # Elevated from step 60 (a warning episode); the Guard rolled back at 69 to the state at the start of 55
    # and went on at 70, still elevated: a new episode, so a new info and warning. Without the rewind the
    # detector would still be inside the first episode and say nothing more.
    losses = _noisy(60, rel=0.01) + [2.6] * 40
    log = _log(list(range(100)), losses)
    plain = [(f.step, f.severity) for f in examine(log).findings if f.kind == "loss_spike"]
    assert plain == [(60, "info"), (62, "warning")]
    log.rollbacks = {69: 55}
    rewound = [(f.step, f.severity) for f in examine(log).findings if f.kind == "loss_spike"]
    assert rewound == [(60, "info"), (62, "warning"), (70, "info"), (72, "warning")]


def test_a_constant_unit_loss_scale_in_any_log_does_not_make_a_nan_a_scaler_overflow(tmp_path):
    """h22-O O6: a CSV with loss_scale=1.0 throughout (bf16 logged by a Megatron-style logger) read a NaN loss as the
    scaler's own skipped overflow (info); a scale that moves is still read as one."""
    from keel.doctor import examine_log

    rows = ["step,loss,loss_scale"] + [f"{s},{2.0 - s * 0.01},1.0" for s in range(40)] + ["40,nan,1.0"]
    unit = tmp_path / "unit.csv"
    unit.write_text("\n".join(rows) + "\n")
    result = examine_log(str(unit))
    assert [(f.step, f.kind, f.severity) for f in result.findings if f.step == 40] == [(40, "non_finite", "critical")]
    assert any("loss scale is 1.0" in note for note in result.summary["notes"])
    moving = tmp_path / "moving.csv"
    moving.write_text("\n".join(r.replace(",1.0", ",65536.0") for r in rows[:-1]) + "\n40,nan,32768.0\n")
    assert [f.kind for f in examine_log(str(moving)).findings if f.step == 40] == ["loss_scale_overflow"]


def test_a_short_log_says_what_its_spike_detectors_can_still_flag(tmp_path, capsys):
    # from the 5th value the spike detectors flag extreme jumps over the values so far (helper A's warm-up rule):
    # "it needs 20 before it can flag anything" was no longer true
    from keel.cli import main

    p = tmp_path / "short.csv"
    p.write_text("step,loss,grad_norm\n" + "".join(f"{s},{30 - s}.0,1.0\n" for s in range(1, 13)))
    detectors = {d["kind"]: d for d in examine_log(p).summary["detectors"] if "kind" in d}
    assert detectors["loss_spike"]["extreme_from_step"] == 6 and detectors["loss_spike"]["extreme_factor"] == 4.0
    assert detectors["grad_spike"]["extreme_factor"] == 10.0 and "extreme_from_step" not in detectors["divergence"]
    assert main(["doctor", str(p)]) == 0
    out = capsys.readouterr().out
    assert "short history for loss_spike on loss: 12 value(s): only jumps to 4x the median so far" in out
    assert "not enough history for divergence on loss: 12 value(s), it needs 20" in out
    p.write_text("step,loss\n1,3.0\n2,2.9\n3,2.8\n")  # under 5 values: nothing can be flagged yet
    assert main(["doctor", str(p)]) == 0
    assert "not enough history for loss_spike on loss: 3 value(s), it needs 20 before it can flag anything" in (
        capsys.readouterr().out
    )
