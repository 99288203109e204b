"""keel doctor on the real training logs of shared/data/realruns (labels.json): no alarm on healthy runs,
the labelled spikes and divergences found where the series has the history the detectors need."""

import json
from pathlib import Path

import pytest

from keel.doctor import examine_log
from keel.harness.bench.doctor import HEALTHY_LABELS, load_prefix, run, score_series

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "realruns"
pytestmark = pytest.mark.skipif(
    not (DATA / "labels.json").is_file(),
    reason=f"real-run logs not found at {DATA} (shared/ sits beside the clone in CI)",
)


def _labels():
    return {entry["file"]: entry for entry in json.loads((DATA / "labels.json").read_text())["series"]}


SHORT = [
    "bloom176b_tr11_spike_31216.csv",
    "bigscience_tr1_13b_spike_29050.csv",
    "bigscience_tr8_104b_exp12_spike_8740_divergence_9027.csv",
    "issue_litgpt_628_codellama_spike.csv",
    "issue_mlx_examples_620_lora_blowup.csv",
    "issue_deeplab_lfov_5_divergence.csv",
    "bloom176b_tr11_throughput_drop_42780.csv",
]

# First alarm (step, kind, severity) with the 64-step healthy prefix, as measured by `keel bench doctor`.
EXPECTED_WITH_PREFIX = {
    "bloom176b_tr11_spike_31216.csv": "31217 grad_spike critical",
    "bigscience_tr1_13b_spike_29050.csv": "29050 loss_spike critical",
    "bigscience_tr8_104b_exp2_glitch_6900.csv": "6940 loss_spike warning",
    "bigscience_tr8_104b_exp11_spike_11447.csv": "11447 grad_spike critical",
    "bigscience_tr8_104b_exp12_spike_8740_divergence_9027.csv": "8741 loss_spike critical",
    "bigscience_tr8b_104b_spike_17062.csv": "17064 loss_spike warning",
    "issue_litgpt_628_codellama_spike.csv": "1152 loss_spike critical",
    "issue_mlx_examples_620_lora_blowup.csv": "75 loss_spike critical",
    "issue_deeplab_lfov_5_divergence.csv": "12981 loss_spike warning",
    # 3 points; its 1.77× one-step jump is within what healthy runs' one-batch outliers reach (1.89×)
    "bigscience_tr8_104b_exp1_divergence_7000.csv": None,
}


def test_short_windows_raise_no_alarm_without_history_and_say_so():
    for name in SHORT:
        result = examine_log(DATA / name)
        assert result.at_least("warning") == [], name
        loss = next(d for d in result.summary["detectors"] if d.get("kind") == "loss_spike")
        if loss["observations"] <= loss["needs"]:
            assert loss["armed_at_step"] is None, name
        else:  # deeplab: 30 points, the spike detector armed from its 21st
            assert loss["armed_at_step"] == result.summary["first_step"] + loss["needs"], name


def test_nan_in_an_fp16_log_with_a_loss_scale_is_read_as_a_scaler_overflow():
    result = examine_log(DATA / "bigscience_tr8_104b_exp12_spike_8740_divergence_9027.csv")
    assert [(f.step, f.kind, f.severity) for f in result.findings] == [(9027, "loss_scale_overflow", "info")]
    assert result.summary["gaps"]["listed"] == [{"after_step": 8743, "next_step": 9026}]


@pytest.fixture(scope="module")
def prefix():
    return load_prefix(DATA)


@pytest.mark.parametrize("name", SHORT[:6])
def test_labelled_events_are_found_with_a_healthy_prefix(name, prefix):
    score = score_series(DATA / name, _labels()[name], prefix)
    assert score.prefixed["detected_by"] == EXPECTED_WITH_PREFIX[name]
    assert score.prefixed["early_alarms"] == 0 and score.prefixed["prefix_alarms"] == 0


@pytest.mark.slow
def test_every_real_run_as_measured_in_benchmarks():
    scores = {s.file: s for s in run(DATA)}
    assert len(scores) == len(_labels())
    healthy = [s for s in scores.values() if s.label in HEALTHY_LABELS]
    assert len(healthy) == 7
    for s in healthy:
        assert (s.file, s.warnings, s.criticals) == (s.file, 0, 0)
    events = {name: s for name, s in scores.items() if s.label not in HEALTHY_LABELS}
    assert {name: s.prefixed["detected_by"] for name, s in events.items()} == EXPECTED_WITH_PREFIX
    assert all(
        s.early_alarms == 0 and s.prefixed["early_alarms"] == 0 and s.prefixed["prefix_alarms"] == 0
        for s in events.values()
    )
