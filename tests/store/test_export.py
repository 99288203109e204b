"""Exporters: each format is read back with its own tool and must hold exactly what the run store holds."""

from __future__ import annotations

import csv
import glob
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keel import Guard
from keel.cli import main as keel_main
from keel.store import RunReader
from keel.store.exporters import export_run, list_exporters
from keel.store.exporters.mlflow import metric_names
from tests.conftest import TinyNet, make_batches

STEPS = 30


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real Guard run with a NaN gradient at step 7 (a skip, findings, NaN signals) and per-parameter signals."""
    path = tmp_path_factory.mktemp("run") / "exp1"
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Guard(
        model, opt, policy="skip", run_dir=str(path), log_every=10, probes="full", config={"lr": 1e-2}, seed=0
    ) as guard:
        for step, (x, y) in enumerate(make_batches(STEPS)):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if step == 7:
                model.fc1.weight.grad[0, 0] = float("nan")
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
    return path


def store_contents(run: Path, keys: list[str] | None = None):
    with RunReader(run) as r:
        signals = {}
        for key in r.signal_keys():
            if keys is None or key in keys:
                steps, values = r.signal(key)
                signals[key] = dict(zip(steps.tolist(), values.tolist(), strict=True))
        return signals, r.findings(), r.decisions(), r.meta()


def same(a: float, b: float, rel: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if rel == 0 else a == pytest.approx(b, rel=rel)


def assert_signals_match(exported: dict[str, dict[int, float]], stored: dict[str, dict[int, float]], rel=0.0):
    assert set(exported) == set(stored)
    for key, by_step in stored.items():
        assert set(exported[key]) == set(by_step), key
        assert all(same(exported[key][s], v, rel) for s, v in by_step.items()), key


def test_the_fixture_run_has_what_exporters_must_carry(run_dir):
    signals, findings, decisions, meta = store_contents(run_dir)
    assert math.isnan(signals["grad/norm"][7]) and "grad/norm/fc1.weight" in signals
    assert [(d.step, d.action) for d in decisions] == [(7, "skip")] and findings and meta["seed"] == 0


def test_csv_round_trips(run_dir, tmp_path):
    paths = export_run(run_dir, "csv", tmp_path)
    assert [p.name for p in paths] == ["signals.csv", "findings.csv", "decisions.csv", "meta.json"]
    with (tmp_path / "signals.csv").open() as f:
        rows = list(csv.DictReader(f))
    exported: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, cell in row.items():
            if key != "step" and cell != "":
                exported.setdefault(key, {})[int(row["step"])] = float(cell)
    signals, findings, decisions, meta = store_contents(run_dir)
    assert_signals_match(exported, signals)  # repr() of a float round-trips exactly
    with (tmp_path / "findings.csv").open() as f:
        found = list(csv.DictReader(f))
    assert [(int(r["step"]), r["kind"], r["cause"]) for r in found] == [(f.step, f.kind, f.cause) for f in findings]
    assert json.loads(found[0]["evidence"]) == json.loads(json.dumps(findings[0].evidence))
    with (tmp_path / "decisions.csv").open() as f:
        assert [(int(r["step"]), r["action"], r["reason"]) for r in csv.DictReader(f)] == [
            (d.step, d.action, d.reason) for d in decisions
        ]
    assert json.loads((tmp_path / "meta.json").read_text())["config"] == meta["config"]


def test_jsonl_round_trips_and_keys_select(run_dir, tmp_path):
    export_run(run_dir, "jsonl", tmp_path)
    exported: dict[str, dict[int, float]] = {}
    for line in (tmp_path / "signals.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            exported.setdefault(key, {})[step] = value
    signals, findings, decisions, _ = store_contents(run_dir)
    assert_signals_match(exported, signals)
    lines = [json.loads(x) for x in (tmp_path / "findings.jsonl").read_text().splitlines()]
    assert [(x["step"], x["kind"], x["severity"]) for x in lines] == [(f.step, f.kind, f.severity) for f in findings]
    export_run(run_dir, "jsonl", tmp_path / "some", keys=["loss", "grad/norm/*"])
    first = json.loads((tmp_path / "some" / "signals.jsonl").read_text().splitlines()[0])
    assert set(first) == {
        "step",
        "loss",
        "grad/norm/fc1.weight",
        "grad/norm/fc1.bias",
        "grad/norm/fc2.weight",
        "grad/norm/fc2.bias",
    }


def test_tensorboard_round_trips(run_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [event_file] = export_run(run_dir, "tensorboard", tmp_path)
    assert event_file.name.startswith("events.out.tfevents.")
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    exported = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    signals, findings, decisions, _ = store_contents(run_dir)
    assert_signals_match(exported, signals, rel=1e-6)  # TensorBoard scalars are float32
    text = {
        tag: [(e.step, json.loads(e.tensor_proto.string_val[0])) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }
    assert [(s, r["kind"]) for s, records in text["keel/findings"] for r in records] == [
        (f.step, f.kind) for f in findings
    ]
    assert [(s, r["action"]) for s, records in text["keel/decisions"] for r in records] == [
        (d.step, d.action) for d in decisions
    ]


def test_wandb_offline_round_trips(run_dir, tmp_path):
    pytest.importorskip("wandb")
    from keel.store.exporters.wandb import records

    [run_path] = export_run(run_dir, "wandb", tmp_path, keys=["loss", "grad/norm", "lr", "grad/norm/fc1.weight"])
    [wandb_file] = glob.glob(str(run_path / "run-*.wandb"))
    exported: dict[str, dict[int, float]] = {}
    config = {}
    for record in records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step")
            for key, value in items.items():
                if not key.startswith(("_", "keel/")):
                    exported.setdefault(key, {})[step] = float(value)
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
    signals, findings, _, _ = store_contents(run_dir, ["loss", "grad/norm", "lr", "grad/norm/fc1.weight"])
    assert_signals_match(exported, signals)
    assert config["lr"] == 1e-2 and config["keel"]["policy"] == "skip"
    [table] = glob.glob(str(run_path / "files" / "media" / "table" / "keel" / "findings_*.table.json"))
    rows = json.loads(Path(table).read_text())["data"]
    assert [(r[0], r[1]) for r in rows] == [(f.step, f.kind) for f in findings]


def test_mlflow_file_store_round_trips(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    keys = ["loss", "grad/norm", "lr", "grad/norm/fc1.weight"]
    export_run(run_dir, "mlflow", tmp_path, keys=keys, tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("keel").experiment_id])
    assert run.info.run_name == run_dir.name and run.data.tags["keel.status"] == "finished"
    assert run.data.params["lr"] == "0.01"
    names = metric_names(keys)
    assert names["grad/norm"] == "grad/norm/all" and names["loss"] == "loss"
    exported = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, names[k])} for k in keys}
    signals, findings, decisions, _ = store_contents(run_dir, keys)
    assert_signals_match(exported, signals)
    artifact = client.download_artifacts(run.info.run_id, "keel/findings.json", str(tmp_path))
    found = json.loads(Path(artifact).read_text())
    assert [(r["step"], r["kind"]) for r in found] == [(f.step, f.kind) for f in findings]


@pytest.mark.slow
def test_mlflow_default_sqlite_store(run_dir, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    export_run(run_dir, "mlflow", tmp_path, keys=["loss"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("keel").experiment_id])
    signals, *_ = store_contents(run_dir, ["loss"])
    assert_signals_match(
        {"loss": {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}}, signals
    )


def test_keel_export_cli(run_dir, tmp_path, capsys):
    assert (
        keel_main(["export", str(run_dir), "--format", "csv", "--out", str(tmp_path), "--keys", "loss,lr", "--json"])
        == 0
    )
    paths = json.loads(capsys.readouterr().out)
    assert paths[0].endswith("signals.csv")
    header = (tmp_path / "signals.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr"
    assert keel_main(["export", str(run_dir), "--format", "parquet"]) == 2  # one error line (keel.cli)


def test_unknown_format_and_missing_run_are_clear(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"format='xml'; allowed: csv, jsonl, mlflow, tensorboard, wandb"):
        export_run(run_dir, "xml")
    with pytest.raises(FileNotFoundError, match="no keel run store"):
        export_run(tmp_path / "nothing", "csv")
    assert list_exporters() == ["csv", "jsonl", "mlflow", "tensorboard", "wandb"]


def test_exporting_imports_no_torch(run_dir, tmp_path):
    code = (
        "import sys; from keel.store.exporters import export_run; import keel.store.exporters.cli; "
        f"export_run({str(run_dir)!r}, 'csv', {str(tmp_path / 'c')!r}); "
        f"export_run({str(run_dir)!r}, 'tensorboard', {str(tmp_path / 't')!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_csv_export_defuses_spreadsheet_formulas_from_store_text(tmp_path):
    from keel._core.finding import Finding
    from keel.store import RunWriter

    run = tmp_path / "crafted"
    writer = RunWriter(run)
    writer.add_signals(0, {'=HYPERLINK("http://x")': 1.0, "loss": -2.5})
    writer.add_findings(
        [
            Finding(
                step=0,
                kind="loss_spike",
                severity="warning",
                signal="loss",
                value=-1.5,
                cause="=cmd|' /C calc'!A0",
                advice="@SUM(A1)",
                evidence={"x": 1},
            )
        ]
    )
    writer.set_meta({"status": "finished"})
    writer.close()
    export_run(run, "csv", tmp_path / "out")
    with (tmp_path / "out" / "signals.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", '\'=HYPERLINK("http://x")', "loss"] and rows[1] == ["0", "1.0", "-2.5"]
    with (tmp_path / "out" / "findings.csv").open() as f:
        [found] = list(csv.DictReader(f))
    assert found["cause"] == "'=cmd|' /C calc'!A0" and found["advice"] == "'@SUM(A1)"
    assert found["value"] == "-1.5", "numbers stay numbers"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "tensorboard"])
def test_an_export_that_cannot_be_written_whole_leaves_the_last_one_and_names_the_folder(tmp_path, fmt):
    # Reviewer W (session 15): on a full disk `keel export RUN --format jsonl` left a truncated signals.jsonl over the
    # last export and said only "[Errno 28] No space left on device". The file-size limit below makes the OS refuse
    # the write past 64 kB (EFBIG), as a full disk refuses it (ENOSPC).
    from keel.store import RunWriter

    run = tmp_path / "run"
    with RunWriter(run) as writer:
        for step in range(4000):
            writer.add_signals(step, {"loss": 2.0 + step * 1e-3, "grad/norm": 1.0 + step * 1e-4})
    out = tmp_path / "exported"
    export_run(run, fmt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
        "from keel.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", limit, "export", str(run), "--format", fmt, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"keel export: error: {out}: File too large"), proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]  # no partial folder left


def test_a_second_tensorboard_export_replaces_the_first(run_dir, tmp_path):
    # Reviewer W (session 15): exporting again into the same folder added a second event file beside the first, so
    # TensorBoard and `keel doctor` read the run twice (800 records for 400 steps, a "restart" at step 0, every
    # finding doubled). csv and jsonl replace their files; the event file now does too.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = export_run(run_dir, "tensorboard", tmp_path)
    time.sleep(1.1)  # another second: the file was named by the time of its export (and the process id)
    second = export_run(run_dir, "tensorboard", tmp_path)
    assert first == second and sorted(p.name for p in tmp_path.iterdir()) == [second[0].name]
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == sorted(set(steps)) and len(steps) == len(store_contents(run_dir)[0]["loss"])
