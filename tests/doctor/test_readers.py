"""Each input format read into records, then into observations with keel keys."""

import json
import math
from pathlib import Path

import pytest

from keel._core import Decision, Finding
from keel.doctor import build_timeline, detect_format, examine_log, read_log
from keel.store import RunWriter

DATA = Path(__file__).parent / "data"


def _obs(path, **kw):
    return build_timeline(read_log(path, **kw)).observations


def test_csv_with_text_column_sparse_cells_nan_and_stray_text(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text(
        "step,loss,grad_norm,lr,date\n0,2.5,1.0,0.001,2024-01-01\n10,2.4,,0.001,2024-01-02\n"
        "20,nan,inf,,2024-01-03\n30,overflow,1.1,0.001,x\n,9.9,9.9,9.9,y\n"
    )
    log = read_log(p)
    assert log.format == "csv" and log.text_columns == ["date"]
    assert [s for s, _ in log.records] == [0, 10, 20, 30]
    assert any("without an integer step" in n for n in log.notes)
    assert any("text cell" in n for n in log.notes)
    obs = build_timeline(log).observations
    assert obs[1].values == {"loss": 2.4, "lr": 0.001}  # an empty cell is "not logged", not NaN
    assert math.isnan(obs[2].values["loss"]) and obs[2].values["grad/norm"] == math.inf
    assert "loss" not in obs[3].values  # a stray text cell is read as not logged


def test_tsv_and_unknown_suffix_are_sniffed(tmp_path):
    p = tmp_path / "metrics.txt"
    p.write_text("global_step\ttrain_loss\n1\t3.0\n2\t2.9\n")
    assert detect_format(p) == "csv"
    assert [(o.step, o.values) for o in _obs(p)] == [(1, {"loss": 3.0}), (2, {"loss": 2.9})]


def test_jsonl_nested_null_nan_strings_and_bad_lines(tmp_path):
    p = tmp_path / "log.jsonl"
    lines = [
        {"step": 0, "train": {"loss": 3.0}, "lr": 1e-3, "tag": "warmup"},
        {"_step": 1, "train": {"loss": None}, "grad_norm": "2.5"},
        {"step": 2, "train": {"loss": float("nan")}},
        {"note": "no step here"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    log = read_log(p)
    assert log.text_columns == ["tag"]
    obs = build_timeline(log).observations
    assert obs[0].values == {"loss": 3.0, "lr": 1e-3}
    assert obs[1].values == {"grad/norm": 2.5}
    assert math.isnan(obs[2].values["loss"])
    assert any("without an integer step" in n for n in log.notes) and any("not JSON" in n for n in log.notes)


def test_json_array_of_log_objects(tmp_path):
    p = tmp_path / "log.json"
    p.write_text(json.dumps([{"iteration": i, "loss": 2.0} for i in range(3)]))
    assert [o.step for o in _obs(p)] == [0, 1, 2]


def _trainer_state(entries, **extra):
    return json.dumps({"global_step": entries[-1]["step"], "logging_steps": 10, "log_history": entries, **extra})


def test_hf_trainer_state_merges_eval_and_drops_the_summary_entry(tmp_path):
    history = [
        {"loss": 2.0, "grad_norm": 1.5, "learning_rate": 5e-5, "epoch": 0.1, "step": 10},
        {"eval_loss": 2.2, "eval_runtime": 3.0, "epoch": 0.1, "step": 10},
        {"loss": 1.9, "grad_norm": 1.4, "learning_rate": 4e-5, "epoch": 0.2, "step": 20},
        {"train_runtime": 100.0, "train_loss": 1.95, "total_flos": 1.0, "epoch": 0.2, "step": 20},
    ]
    ckpt = tmp_path / "out" / "checkpoint-20"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(_trainer_state(history))
    older = tmp_path / "out" / "checkpoint-5"
    older.mkdir()
    (older / "trainer_state.json").write_text(_trainer_state(history[:1]))
    log = read_log(tmp_path / "out")  # an output folder: the newest checkpoint's state
    assert log.format == "hf_trainer_state" and log.meta["logging_steps"] == 10
    obs = build_timeline(log).observations
    assert [(o.step, o.values["loss"]) for o in obs] == [(10, 2.0), (20, 1.9)]  # no fake 1.95 at the end
    assert obs[0].values["val/loss"] == 2.2 and obs[0].values["lr"] == 5e-5
    assert obs[0].values["grad/norm"] == 1.5
    assert any("summary" in n for n in log.notes)


def test_tensorboard_simple_value_file_and_folder():
    folder = DATA / "tb_simple"
    file = next(folder.glob("events.out.tfevents.*"))
    for path in (folder, file):
        obs = _obs(path)
        assert [o.step for o in obs] == list(range(60))
        assert obs[1].values["loss"] == pytest.approx(3.01)
        assert obs[1].values["grad/norm"] == pytest.approx(1.05)
        assert obs[0].values["lr"] == pytest.approx(1e-3)
        assert math.isnan(obs[50].values["loss"])
    assert any("non-scalar" in n for n in read_log(folder).notes)  # the histogram was skipped
    found = examine_log(folder).at_least("critical")
    assert [(f.step, f.kind) for f in found] == [(50, "non_finite")]


def test_tensorboard_tensor_scalars_in_subfolders_are_prefixed():
    obs = _obs(DATA / "tb_tensor")
    assert len(obs) == 30
    assert obs[2].values["loss"] == pytest.approx(3.02)  # train/epoch_loss (Keras)
    assert obs[2].values["val/loss"] == pytest.approx(3.52)  # validation/epoch_loss


def test_tensorboard_truncated_last_record_is_tolerated(tmp_path):
    data = next((DATA / "tb_simple").glob("events.*")).read_bytes()
    p = tmp_path / "events.out.tfevents.cut"
    p.write_bytes(data[:-7])
    obs = _obs(p)
    assert 55 <= len(obs) <= 60 and obs[0].values["loss"] == 3.0


def test_keel_run_store_with_families_and_stored_findings(tmp_path):
    with RunWriter(tmp_path / "run") as w:
        for step in range(30):
            values = {"loss": 2.0, "grad/norm": 1.0, "lr": 0.1}
            if step % 10 == 0:
                values.update({"grad/norm/fc1.weight": 0.6, "grad/norm/fc2.weight": 0.8})
            w.add_signals(step, values)
        w.add_signals(30, {"loss": math.nan, "grad/norm": 1.0})
        w.add_findings([Finding(step=30, kind="non_finite", severity="critical", signal="loss")])
        w.add_decision(Decision(step=30, action="skip", reason="non-finite loss"))
    for path in (tmp_path / "run", tmp_path / "run" / "run.sqlite"):
        log = read_log(path)
        assert log.format == "keel_store" and len(log.stored_findings) == 1
        obs = build_timeline(log).observations
        assert obs[10].per_param["grad/norm/"] == (("fc1.weight", "fc2.weight"), [0.6, 0.8])
        assert "grad/norm/fc1.weight" not in obs[10].values and obs[10].values["grad/norm"] == 1.0
    result = examine_log(tmp_path / "run")
    assert [(f.step, f.kind) for f in result.at_least("warning")] == [(30, "non_finite")]
    assert result.summary["stored_findings"]["critical"] == 1


def test_tensorboard_run_in_a_subfolder_keeps_plain_tags(tmp_path):
    # The Hugging Face Trainer writes output_dir/runs/<date_host>/events…: one folder, no prefix.
    run = tmp_path / "runs" / "Nov29_10-00-00_host"
    run.mkdir(parents=True)
    src = next((DATA / "tb_simple").glob("events.*"))
    (run / src.name).write_bytes(src.read_bytes())
    obs = _obs(tmp_path / "runs")
    assert obs[1].values["loss"] == pytest.approx(3.01) and "lr" in obs[1].values


def test_a_real_trainer_state_written_by_transformers():
    # tests/doctor/data/hf_out: a 40-step tiny GPT-2 Trainer run (logging_steps=5, eval every 20 steps).
    log = read_log(DATA / "hf_out")
    assert log.format == "hf_trainer_state" and log.meta["logging_steps"] == 5
    obs = build_timeline(log).observations
    assert [o.step for o in obs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"loss", "grad/norm", "lr", "epoch"} <= set(obs[0].values)
    assert "val/loss" in obs[3].values and "val/loss" in obs[7].values and "val/loss" not in obs[0].values
    result = examine_log(DATA / "hf_out")
    assert result.summary["stride"] == 5 and result.findings == []
    divergence = next(d for d in result.summary["detectors"] if d.get("kind") == "divergence")
    assert divergence["needs"] == 9  # ceil(20 steps / 5 per log), at least its 9-value median
