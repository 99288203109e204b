"""`keel doctor` output: the table, --json, --fail-on; and doctor on a store the Guard wrote itself."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keel import Guard
from keel.cli import main
from keel.doctor import examine_log
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches, observe_poisoned_run


@pytest.fixture
def spiky_csv(tmp_path):
    rng = np.random.default_rng(0)
    losses = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(200)]
    losses[60] = 2.5  # one outlier batch: info
    for i in range(120, 126):
        losses[i] = 2.7  # persistent: a warning
    losses[180] = 7.0  # extreme: critical
    p = tmp_path / "train.csv"
    p.write_text("step,loss,lr\n" + "".join(f"{s},{v!r},0.001\n" for s, v in enumerate(losses)))
    return p


def _no_nan(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in output"))


def test_table_shows_alarms_with_cause_and_advice_and_counts_infos(spiky_csv, capsys):
    assert main(["doctor", str(spiky_csv)]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "severity" in out and "evidence" in out
    lines = out.splitlines()
    crit = next(i for i, line in enumerate(lines) if line.split()[:3] == ["180", "critical", "loss_spike"])
    assert "z=" in lines[crit] and "ratio=" in lines[crit]
    assert lines[crit + 1].strip().startswith("cause:") and any(
        line.strip().startswith("advice:") for line in lines[crit + 1 : crit + 8]
    )
    assert any(line.split()[:3] == ["122", "warning", "loss_spike"] for line in lines)
    assert "loss_spike (info) at steps 60, 120" in out  # below the table, counted
    assert "findings: 1 critical, 1 warning, 2 info" in out


def test_all_lists_infos_in_the_table(spiky_csv, capsys):
    main(["doctor", str(spiky_csv), "--all"])
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["60", "info", "loss_spike"] for line in out.splitlines())


def test_json_shape(spiky_csv, capsys):
    assert main(["doctor", str(spiky_csv), "--json"]) == 0
    doc = _no_nan(capsys.readouterr().out)
    assert doc["source"] == str(spiky_csv) and doc["format"] == "csv"
    assert {"counts", "stride", "signals", "detectors", "restarts", "gaps"} <= set(doc["summary"])
    first = doc["findings"][0]
    assert set(first) >= {"step", "kind", "severity", "signal", "value", "baseline", "cause", "advice"}
    assert [(f["step"], f["severity"]) for f in doc["findings"]] == [
        (60, "info"),
        (120, "info"),
        (122, "warning"),
        (180, "critical"),
    ]
    assert doc["summary"]["signals"]["loss"] == {"column": "loss", "observations": 200, "non_finite": 0}


def test_json_writes_null_for_non_finite_values(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n" + "".join(f"{s},2.0\n" for s in range(5)) + "5,inf\n")
    main(["doctor", str(p), "--json"])
    doc = _no_nan(capsys.readouterr().out)
    assert doc["findings"][-1]["kind"] == "non_finite" and doc["findings"][-1]["value"] is None


@pytest.mark.parametrize("fail_on,code", [(None, 0), ("warning", 1), ("critical", 1)])
def test_fail_on_sets_the_exit_status(spiky_csv, capsys, fail_on, code):
    args = ["doctor", str(spiky_csv)] + (["--fail-on", fail_on] if fail_on else [])
    assert main(args) == code


def test_fail_on_critical_passes_a_log_with_only_warnings(tmp_path, capsys):
    losses = [2.0 + 0.01 * (s % 3) for s in range(100)]
    for i in range(50, 56):
        losses[i] = 2.6
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in enumerate(losses)))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 0
    assert main(["doctor", str(p), "--fail-on", "warning"]) == 1


def test_doctor_on_a_guard_store_finds_what_the_guard_found_live(tmp_path):
    observe_poisoned_run(tmp_path / "run")  # batch 60's loss jumps ~900×
    with RunReader(tmp_path / "run") as run:
        live = [(f.step, f.kind, f.severity) for f in run.findings()]
    result = examine_log(tmp_path / "run")
    assert (60, "loss_spike", "critical") in live
    assert [(f.step, f.kind, f.severity) for f in result.findings] == live
    assert result.summary["stored_findings"]["critical"] == sum(s == "critical" for *_, s in live)
    assert math.isfinite(result.findings[0].value)


def test_doctor_replays_a_guard_rollback_and_still_matches_the_live_findings(tmp_path):
    from keel import RecoveryConfig

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        max_consecutive_skips=3,
        run_dir=str(tmp_path / "run"),
        recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1),
    )
    for step, (x, y) in enumerate(make_batches(60)):
        if step == 23:
            with torch.no_grad():
                model.fc1.weight[0, 0] = float("nan")  # a bit flip: a rollback at once
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    with RunReader(tmp_path / "run") as run:
        live = [(f.step, f.kind, f.severity) for f in run.findings()]
        [rollback] = [d for d in run.decisions() if d.action == "rollback"]
    assert rollback.restored_step <= 22 < 23 <= rollback.step
    result = examine_log(tmp_path / "run")
    assert [(f.step, f.kind, f.severity) for f in result.findings] == live
    assert any(kind == "non_finite" for _, kind, _ in live)
