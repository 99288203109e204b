"""Writes the W&B and MLflow fixtures in this folder with wandb's and mlflow's own writers, not keel's.

Run from the repository root with wandb and mlflow installed (both are in the dev environment):
``python tests/doctor/data/make_tracker_fixtures.py``. The tests read the committed files, so they need neither.
Each step runs in a child process (W&B's run state is per process; the killed run is killed with SIGKILL).

- ``wandb_runs/wandb/``: offline runs (``WANDB_MODE=offline``, wandb 0.31 / wandb-core):
  ``offline-run-*-basic01``: ``train/loss``, ``train/grad_norm``, ``train/learning_rate``, a unicode key, at steps
  0..199 (``run.log(step=)``), NaN loss at step 50, +inf at 60, ``eval/loss`` every 50 steps, one histogram;
  ``offline-run-*-res01`` twice: steps 0..99 (W&B's own ``_step``), then resumed (``resume="allow"``) at 80..149;
  ``offline-run-*-kill01``: the process SIGKILLed after step 400, so the file has no exit record.
- ``wandb_hf/wandb/``: an HF Trainer run (``report_to="wandb"``), the tiny Llama of ``tests/tiny_hf.py``, 30 steps
  logged every step, evaluated every 10.
- ``mlflow_hf.sql``: the ``runs`` and ``metrics`` tables (schema and rows) of the ``mlflow.db`` an HF Trainer run
  (``report_to="mlflow"``, same model and steps) wrote; the full database (1 MB, 30 tables) is cut to what keel
  reads, as SQL so that the diff is readable. ``tests/doctor/test_trackers.py`` loads it into a file.
- ``mlruns/``: the file store (``MLFLOW_ALLOW_FILE_STORE=true``) of two runs: ``train/loss``, ``grad_norm``,
  ``learning_rate`` at steps 0..99 with NaN at 40 and +inf at 41, and ``eval_loss`` logged with no step; and a
  two-step ``loss``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def wandb_run(kind: str, root: str) -> None:
    import wandb

    if kind == "basic":
        run = wandb.init(project="p", dir=root, id="basic01", config={"lr": 0.1})
        for step in range(200):
            loss = {50: float("nan"), 60: float("inf")}.get(step, 2.0 - step * 0.005)
            row = {"train/loss": loss, "train/grad_norm": 1.0 + step % 7, "train/learning_rate": 1e-3, "ünï/kéy": step}
            if step == 0:
                row["weights"] = wandb.Histogram([0.1, 0.2, 0.2, 0.5])
            run.log(row, step=step)
            if step % 50 == 0:
                run.log({"eval/loss": 2.1 - step * 0.004}, step=step)
    elif kind == "resume1":
        run = wandb.init(project="p", dir=root, id="res01")
        for step in range(100):
            run.log({"loss": 3.0 - step * 0.01})
    elif kind == "resume2":
        run = wandb.init(project="p", dir=root, id="res01", resume="allow")
        for step in range(80, 150):
            run.log({"loss": 2.5 - step * 0.01}, step=step)
    elif kind == "killed":
        run = wandb.init(project="p", dir=root, id="kill01")
        for step in range(401):
            run.log({"loss": 3.0 - step * 1e-3, "grad_norm": 1.0})
        run.log({}, commit=True)
        os.kill(os.getpid(), signal.SIGKILL)
    run.finish()


def mlflow_runs(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("exp-ü")
    with mlflow.start_run(run_name="a"):
        for step in range(100):
            loss = {40: float("nan"), 41: float("inf")}.get(step, 2 - step * 0.01)
            mlflow.log_metrics({"train/loss": loss, "grad_norm": 1.0 + step % 3, "learning_rate": 1e-3}, step=step)
        mlflow.log_metric("eval_loss", 1.5)
    with mlflow.start_run(run_name="b"):
        mlflow.log_metric("loss", 1.0, step=0)
        mlflow.log_metric("loss", 0.9, step=1)


def hf_run(target: str, out: str) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.tiny_hf import tiny_llama

    os.chdir(out)
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{out}/mlflow.db", HF_MLFLOW_LOG_ARTIFACTS="0", WANDB_DIR=out)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 256

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=f"{out}/hf",
        max_steps=30,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[target],
        learning_rate=1e-3,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=10,
        use_cpu=True,
        disable_tqdm=True,
    )
    transformers.Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), eval_dataset=Tokens()).train()


def child(*args: str) -> None:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")
    subprocess.run([sys.executable, __file__, *args], env=env, check=False)


def keep_run_files(src: Path, dest: Path) -> None:
    """Only the ``.wandb`` files of ``src/wandb/*run-*``: the logs and requirements are not read."""
    shutil.rmtree(dest, ignore_errors=True)
    for file in sorted(src.glob("wandb/*run-*/*.wandb")):
        (dest / "wandb" / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, dest / "wandb" / file.parent.name / file.name)


def dump_tables(db: Path, dest: Path) -> None:
    with sqlite3.connect(db) as src:
        lines = [sql + ";" for (sql,) in src.execute("SELECT sql FROM sqlite_master WHERE name IN ('runs', 'metrics')")]
        for table in ("runs", "metrics"):
            for row in src.execute(f"SELECT * FROM {table}"):
                lines.append(f"INSERT INTO {table} VALUES ({', '.join(_sql(v) for v in row)});")
    dest.write_text("\n".join(lines) + "\n")


def _sql(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("basic", "resume1", "resume2", "killed"):
            child("wandb", kind, f"{tmp}/runs")
        keep_run_files(Path(tmp, "runs"), HERE / "wandb_runs")
        child("hf", "wandb", f"{tmp}/hfwb")
        keep_run_files(Path(tmp, "hfwb"), HERE / "wandb_hf")
        child("hf", "mlflow", f"{tmp}/hfml")
        dump_tables(Path(tmp, "hfml", "mlflow.db"), HERE / "mlflow_hf.sql")
        shutil.rmtree(HERE / "mlruns", ignore_errors=True)
        child("mlflow", f"file://{HERE / 'mlruns'}")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        main()
    elif sys.argv[1] == "wandb":
        wandb_run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "hf":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        hf_run(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "mlflow":
        mlflow_runs(sys.argv[2])
