"""keel demo's stabilized arm: the unstable recipe after keel.stabilize trains without findings."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import pytest

from keel.cli import main
from keel.demo import STABILIZERS, UNSTABLE, demo_runs, print_diagnosis
from keel.proxy.trainer import train_proxy

SERIOUS = ("warning", "critical")


def test_stabilized_arm_is_the_unstable_recipe_after_stabilize() -> None:
    for quick in (False, True):
        arms = {a.name: a for a in demo_runs(quick)}
        assert list(arms) == ["reference", "bare", "guarded", "recovering", "stabilized"]
        assert arms["bare"].config.lr == UNSTABLE.lr
        # Only the stabilizers differ: same size, LR, schedule, optimizer, seed and steps as the bare arm.
        assert arms["stabilized"].config == replace(arms["bare"].config, stabilize=STABILIZERS)
        assert arms["stabilized"].policy == "observe"  # prevention alone: keel never acts on this arm
    assert STABILIZERS == ("qk_norm", "z_loss")


def test_stabilized_arm_has_no_findings_where_the_bare_arm_has_critical_ones(tmp_path) -> None:
    # 40 steps are enough: the bare recipe's attention logits run away from step 5 (critical by step 20).
    arms = {a.name: a for a in demo_runs(quick=True)}
    runs = {
        name: train_proxy(replace(arms[name].config, steps=40), policy="observe", run_dir=str(tmp_path / name))
        for name in ("bare", "stabilized")
    }
    bare_serious = [f for f in runs["bare"].findings if f.severity in SERIOUS]
    assert any(f.severity == "critical" and f.kind.startswith("attention") for f in bare_serious), bare_serious
    assert [f for f in runs["stabilized"].findings if f.severity in SERIOUS] == []
    losses = runs["stabilized"].losses
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < math.log(256) - 2  # learning: well below the uniform-byte loss 5.55
    out = io.StringIO()
    print_diagnosis(runs["bare"], runs["stabilized"], out)
    text = out.getvalue()
    assert "1. Attention-logit growth (first seen at step 5, critical at step 20" in text, text
    assert "QK-norm" in text and "arXiv" in text  # the advice, with its source


@pytest.mark.slow
def test_quick_demo_stabilized_arm_trains_as_well_as_the_safe_lr_reference(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    # The bare run's diagnosis says when keel first saw it and how many steps later the loss degraded.
    assert "1. Attention-logit growth (first seen at step 5" in captured.err
    assert "steps later" in captured.err
    stabilized, bare, reference = result["stabilized"], result["bare"], result["reference"]
    assert stabilized["stabilize"] == list(STABILIZERS) and bare["stabilize"] == []
    assert [f for f in stabilized["findings"] if f["severity"] in SERIOUS] == []
    assert any(f["severity"] == "critical" for f in bare["findings"])
    # At 33x the safe LR, the stabilized run ends as healthy as the reference and clearly below the bare one.
    assert stabilized["val_loss"] < reference["val_loss"] + 0.1
    assert stabilized["val_loss"] < bare["val_loss"] - 0.2
    html = (tmp_path / "report.html").read_text()
    assert all(name in html for name in result)


def test_the_summary_lists_a_rollback_after_the_findings_of_its_step_and_before_later_ones() -> None:
    # `keel demo` printed every finding first and the rollbacks after them: a warning at step 33 came before the
    # step-20 rollback that preceded it.
    from keel._core.decision import Decision
    from keel._core.finding import Finding
    from keel.demo import print_summary
    from keel.proxy.trainer import ProxyRun

    arm = next(a for a in demo_runs(quick=True) if a.name == "recovering")
    run = ProxyRun(config=arm.config, policy="recover")
    run.findings = [
        Finding(step=5, kind="attention_logit_growth", severity="warning", signal="attn/max_logit", value=15.5),
        Finding(step=20, kind="attention_logit_growth", severity="critical", signal="attn/max_logit", value=1226),
        Finding(step=33, kind="attention_logit_growth", severity="warning", signal="attn/max_logit", value=6.7),
    ]
    run.decisions = [Decision(step=20, action="rollback", reason="rolled back to the snapshot of step 0")]
    out = io.StringIO()
    print_summary({arm.name: run}, [arm], out)
    lines = [line.split() for line in out.getvalue().splitlines() if line.strip().startswith("step ")]
    expected = [("5", "warning"), ("20", "critical"), ("20", "ROLLBACK:"), ("33", "warning")]
    assert [(w[1], w[2]) for w in lines] == expected
