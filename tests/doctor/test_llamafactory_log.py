"""LLaMA-Factory's ``trainer_log.jsonl`` (its LogCallback, one JSON object per Trainer log: ``current_steps``,
``total_steps``, ``loss``, ``lr``, ``epoch``, ``percentage``, times as text; ``eval_loss`` on evaluation logs) read by
``keel doctor`` like any JSON-lines log. Its step field is ``current_steps``: the doctor refused the file before."""

import json
import math

from keel.cli import main
from keel.doctor import build_timeline, detect_format, examine_log, read_log


def _entry(step: int, total: int, **fields: float) -> str:
    # the LogCallback's fields, in its order, the ones that are None left out as it does
    entry = {"current_steps": step, "total_steps": total, **fields, "epoch": round(step / total, 2)}
    entry |= {"percentage": round(100 * step / total, 2), "elapsed_time": "0:00:10", "remaining_time": "0:03:10"}
    return json.dumps(entry)


def _loss(step: int) -> float:
    return 1.0 + 2.5 * math.exp(-step / 80) + 0.03 * math.sin(step * 1.7)


def test_current_steps_is_the_step_and_loss_lr_eval_loss_are_read(tmp_path):
    p = tmp_path / "trainer_log.jsonl"
    lines = [_entry(s, 300, loss=round(_loss(s), 4), lr=2e-5) for s in range(10, 301, 10)]
    lines.insert(10, _entry(100, 300, eval_loss=1.93))
    p.write_text("\n".join(lines) + "\n")
    assert detect_format(p) == "jsonl"
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert sorted(obs)[:3] == [10, 20, 30] and len(obs) == 30
    assert obs[10]["loss"] == round(_loss(10), 4) and obs[10]["lr"] == 2e-5
    assert obs[100]["val/loss"] == 1.93 and obs[100]["loss"] == round(_loss(100), 4)


def test_a_loss_spike_in_a_llamafactory_log_is_found_and_a_healthy_one_is_quiet(tmp_path, capsys):
    healthy = [_entry(s, 600, loss=round(_loss(s), 4), lr=2e-5) for s in range(5, 601, 5)]
    spiked = [_entry(s, 600, loss=9.5 if s == 400 else round(_loss(s), 4), lr=2e-5) for s in range(5, 601, 5)]
    (tmp_path / "healthy").mkdir()
    (tmp_path / "spiked").mkdir()
    (tmp_path / "healthy" / "trainer_log.jsonl").write_text("\n".join(healthy) + "\n")
    (tmp_path / "spiked" / "trainer_log.jsonl").write_text("\n".join(spiked) + "\n")
    assert not examine_log(tmp_path / "healthy" / "trainer_log.jsonl").findings
    findings = examine_log(tmp_path / "spiked" / "trainer_log.jsonl").findings
    assert [f.step for f in findings if f.kind == "loss_spike"] == [400], findings
    assert main(["doctor", "--fail-on", "warning", str(tmp_path / "healthy" / "trainer_log.jsonl")]) == 0
    assert main(["doctor", "--fail-on", "warning", str(tmp_path / "spiked" / "trainer_log.jsonl")]) == 1
    assert "loss_spike" in capsys.readouterr().out
