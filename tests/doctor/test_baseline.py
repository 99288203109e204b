"""The "baseline" column of a predictive finding is the level the signal grew from, not the critical threshold.

Worked example: the max attention logit sits at 4.0 for 30 steps, then grows ×1.5 per step (4·1.5^k at step
29 + k). The fast rule's window of 5 points first shows the growth at step 32 (window 28–32: 4, 4, 6, 9, 13.5,
median pairwise log-slope ln 1.5 ≈ 0.405 ≥ 0.35), so the episode's onset is step 28, where the logit was 4.0;
two qualifying steps later, step 33 (4·1.5⁴ = 20.25) is the warning. Step 43 (4·1.5¹⁴ ≈ 1167.7) crosses the
critical level 1000. Both findings grew from 4.0: that is their baseline; 1000 stays in the evidence.
"""

import json

import pytest

from keel._core import Observation
from keel.cli import main
from keel.detect import AttentionLogitGrowthDetector


def _logits():
    return [4.0] * 30 + [4.0 * 1.5**k for k in range(1, 16)]


@pytest.fixture
def growth_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("step,loss,attn/max_logit\n" + "".join(f"{s},2.0,{v!r}\n" for s, v in enumerate(_logits())))
    return path


def _row(out: str, step: int) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [str(step)])


def test_the_baseline_column_shows_the_level_the_growth_began_at(growth_csv, capsys):
    assert main(["doctor", str(growth_csv)]) == 0
    out = capsys.readouterr().out
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["step", "severity"])
    for step, severity, value in ((33, "warning", "20.25"), (43, "critical", "1168")):
        row = _row(out, step)
        assert row[1:3] == [severity, "attention_logit_growth"]
        assert row[header.index("value")] == value and row[header.index("baseline")] == "4"  # not 1000
    assert "critical_level=1000" in " ".join(_row(out, 33))


def test_the_json_baseline_is_the_onset_level(growth_csv, capsys):
    main(["doctor", str(growth_csv), "--json"])
    growth = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["kind"] == "attention_logit_growth"]
    assert [(f["step"], f["baseline"], f["evidence"]["onset_step"]) for f in growth] == [(33, 4.0, 28), (43, 4.0, 28)]


def test_the_onset_level_survives_a_state_round_trip():
    live, logits = AttentionLogitGrowthDetector(), _logits()
    for step, v in enumerate(logits[:33]):  # through the onset, before the warning
        live.update(Observation(step=step, values={"attn/max_logit": v}))
    resumed = AttentionLogitGrowthDetector()
    resumed.load_state_dict(json.loads(json.dumps(live.state_dict())))  # as a snapshot stores it
    [warning] = resumed.update(Observation(step=33, values={"attn/max_logit": logits[33]}))
    assert (warning.step, warning.severity, warning.baseline) == (33, "warning", 4.0)
