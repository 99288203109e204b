import dataclasses
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keel._core import keys
from keel.proxy.sweep import SweepConfig, SweepStore, expand_grid, load_sweep, run_one, run_sweep
from keel.proxy.sweep.runner import run_dir_for
from keel.proxy.trainer import TrainConfig
from keel.store import RunReader
from tests.proxy.sweep.conftest import DIVERGING_LR, TINY_RUN


def broken(base):
    raise RuntimeError("this recipe is broken")


def unknown_size(base):
    return dataclasses.replace(base, size="huge")  # accepted here, rejected when the model is built


def test_raising_and_diverging_runs_are_recorded_and_the_sweep_goes_on(tmp_path, tiny_sweep):
    config = tiny_sweep(recipes=["baseline", broken, unknown_size], lrs=[1e-2, DIVERGING_LR])
    events = []
    result = run_sweep(config, tmp_path, workers=1, progress=events.append)
    status = {r["run_id"]: r for r in result.rows}
    assert len(events) == 6 and [e.done for e in events] == [1, 2, 3, 4, 5, 6] and events[0].total == 6
    ok, blown = status["baseline/tiny/lr=0.01/seed=0"], status["baseline/tiny/lr=1000/seed=0"]
    assert ok["status"] == "done" and ok["val_loss"] < ok["init_loss"] and ok["steps_done"] == TINY_RUN["steps"]
    assert blown["status"] == "diverged" and (
        "loss at initialisation" in blown["error"] or "non-finite" in blown["error"]
    )
    for lr in ("0.01", "1000"):
        assert status[f"broken/tiny/lr={lr}/seed=0"]["status"] == "error"
        assert "RuntimeError: this recipe is broken" in status[f"broken/tiny/lr={lr}/seed=0"]["error"]
        assert status[f"unknown_size/tiny/lr={lr}/seed=0"]["status"] == "error"
        assert "unknown proxy size 'huge'" in status[f"unknown_size/tiny/lr={lr}/seed=0"]["error"]
    # Only the baseline has a curve; its diverged run counts as the loss at initialisation.
    (curve,) = result.curves
    assert curve.recipe == "baseline" and curve.runs == 2 and curve.diverged == 1
    assert curve.sensitivity.lr_sensitivity == pytest.approx((ok["init_loss"] - ok["val_loss"]) / 2)
    assert curve.sensitivity.best_lr == 1e-2 and curve.sensitivity.best_loss == pytest.approx(ok["val_loss"])


def test_each_run_keeps_its_own_run_store_with_the_end_signals(tmp_path, tiny_sweep):
    result = run_sweep(tiny_sweep(recipes=["qk_norm_z_loss"], lrs=[3e-2]), tmp_path, workers=1)
    (row,) = result.rows
    assert row["run_dir"] == str(run_dir_for(tmp_path, row["run_id"]))
    assert (Path(row["run_dir"]) / "run.sqlite").is_file()
    with RunReader(row["run_dir"]) as reader:
        meta = reader.meta()
        _, logits = reader.signal("attn/max_logit")
        _, log_z = reader.signal("logits/log_z")
    assert meta["policy"] == "observe" and meta["config"]["qk_norm"] and meta["config"]["z_loss"] == 1e-4
    assert len(logits) == TINY_RUN["steps"] and row["max_attn_logit"] == pytest.approx(float(np.median(logits)))
    assert math.isfinite(row["log_z"]) and min(log_z) <= row["log_z"] <= max(log_z)
    with SweepStore(tmp_path, readonly=True) as store:
        assert store.meta()["sweep"]["recipes"] == ["qk_norm_z_loss"] and "versions" in store.meta()


def test_resume_runs_only_what_is_unfinished(tmp_path, tiny_sweep):
    first = run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2]), tmp_path, workers=1)
    (done_row,) = first.rows
    # A sweep killed while a run was in flight leaves it "running": it must run again.
    grown = tiny_sweep(recipes=["baseline"], lrs=[1e-2, 2e-2, 3e-2])
    with SweepStore(tmp_path) as store:
        store.add_runs(expand_grid(grown), lambda rid: run_dir_for(tmp_path, rid))
        store.mark_running("baseline/tiny/lr=0.03/seed=0")
    second = run_sweep(grown, tmp_path, workers=1)
    assert second.skipped == ["baseline/tiny/lr=0.01/seed=0"]
    assert sorted(second.ran) == ["baseline/tiny/lr=0.02/seed=0", "baseline/tiny/lr=0.03/seed=0"]
    rows = {r["run_id"]: r for r in second.rows}
    assert rows["baseline/tiny/lr=0.01/seed=0"]["finished"] == done_row["finished"]
    assert rows["baseline/tiny/lr=0.01/seed=0"]["attempts"] == 1
    assert (
        rows["baseline/tiny/lr=0.03/seed=0"]["attempts"] == 2 and rows["baseline/tiny/lr=0.02/seed=0"]["attempts"] == 1
    )
    assert all(r["status"] == "done" for r in rows.values()) and len(second.curves[0].sensitivity.lrs) == 3
    assert run_sweep(grown, tmp_path, workers=1).ran == []


# Six runs of ~12 steps: long enough that the sweep can be killed between its first finished run and its
# last. In process (workers=1) the kill lands in the driver while it trains; with the default backend, the
# process pool (workers=2, slow: each spawned worker imports torch), it takes the workers down with it.
KILLED = dict(recipes=["baseline", "qk_norm"], lrs=[1e-3, 1e-2, 3e-2], sizes=["tiny"])
KILLED_RUN = dict(steps=12, batch_size=4, seq_len=16, warmup=2, eval_batches=1, max_grad_norm=1.0)
_KILLED_SWEEP = f"""
import sys
from keel.proxy.sweep import SweepConfig, run_sweep
from keel.proxy.trainer import TrainConfig
run_sweep(SweepConfig(**{KILLED!r}, base=TrainConfig(**{KILLED_RUN!r})), sys.argv[1], workers=int(sys.argv[2]))
"""


def _killed() -> SweepConfig:
    return SweepConfig(**KILLED, base=TrainConfig(**KILLED_RUN))


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_sweep_resumes_with_only_the_unfinished_runs(tmp_path, workers):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[3] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SWEEP, str(tmp_path), str(workers)], env=env, start_new_session=True
    )
    finished_before: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not finished_before:
            try:
                with SweepStore(tmp_path, readonly=True) as store:
                    finished_before = {r["run_id"]: r["finished"] for r in store.rows() if r["status"] == "done"}
            except (FileNotFoundError, sqlite3.OperationalError):
                pass  # the store, or its tables, not created yet
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the whole sweep (driver and any pool workers), mid-way
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep must die by the kill, not finish or fail by itself"
    assert 1 <= len(finished_before) < 6, "the sweep must be killed mid-way for this test to mean anything"
    with SweepStore(tmp_path, readonly=True) as store:
        killed = {r["run_id"]: r for r in store.rows()}
    unfinished = {rid for rid, r in killed.items() if r["status"] in ("pending", "running")}
    assert unfinished and {rid for rid, r in killed.items() if r["status"] == "done"} == set(killed) - unfinished
    in_flight = {rid for rid, r in killed.items() if r["status"] == "running"}
    # Killed while a run was in flight: whatever it had written must not leak into its re-run.
    assert in_flight
    resumed = run_sweep(_killed(), tmp_path, workers=1)
    assert set(resumed.ran) == unfinished and set(resumed.skipped) == set(killed) - unfinished
    after = {r["run_id"]: r for r in resumed.rows}
    assert all(r["status"] == "done" for r in after.values())
    for rid, row in killed.items():
        if rid not in unfinished:  # untouched by the resume
            assert after[rid]["finished"] == row["finished"] and after[rid]["attempts"] == 1
    specs = {s.run_id: s for s in expand_grid(_killed())}
    for rid in in_flight:  # the killed attempt's store was cleared: one loss per step, not the sum of both
        assert after[rid]["attempts"] == 2 and after[rid]["steps_done"] == KILLED_RUN["steps"]
        with RunReader(after[rid]["run_dir"]) as reader:
            steps, _ = reader.signal("loss")
        assert list(steps) == list(range(KILLED_RUN["steps"]))
        # ... and its numbers are those of the same run never killed.
        clean = run_one(specs[rid], tmp_path / "clean" / str(len(rid)))
        assert (after[rid]["val_loss"], after[rid]["max_attn_logit"]) == (clean.val_loss, clean.max_attn_logit)
    assert len(resumed.curves) == 2 and load_sweep(tmp_path).curves == resumed.curves


@pytest.mark.slow
def test_a_worker_killed_by_its_run_is_an_error_and_the_pool_goes_on(tmp_path, tiny_sweep):
    # Slow: three spawned pools (the broken one, then each run that was in flight, alone), each worker
    # importing torch.
    from tests.proxy.sweep._dies import kills_its_worker

    config = tiny_sweep(recipes=["baseline", kills_its_worker], lrs=[1e-2])
    result = run_sweep(config, tmp_path / "pool", workers=2)
    rows = {r["run_id"]: r for r in result.rows}
    assert sorted(result.ran) == sorted(rows)  # the sweep finished every run, none left pending
    dead = rows["kills_its_worker/tiny/lr=0.01/seed=0"]
    assert dead["status"] == "error" and "worker failed: BrokenProcessPool" in dead["error"]
    # The run in flight beside the killer ran again, alone, and matches a run that never shared a pool.
    alone = run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2]), tmp_path / "alone", workers=1)
    for row in alone.rows:
        again = rows[row["run_id"]]
        assert again["status"] == "done" and again["val_loss"] == row["val_loss"]
        assert again["max_attn_logit"] == row["max_attn_logit"]


@pytest.mark.slow  # ~2 s; the fast checks of the same claim: test_worker.py (a run store) and test_router_summary.py
def test_an_moe_run_records_the_routers_end_signals_and_a_dense_one_none(tmp_path, tiny_sweep):
    result = run_sweep(tiny_sweep(recipes=["moe_baseline", "baseline"], lrs=[1e-2]), tmp_path, workers=1)
    moe, dense = result.rows
    with RunReader(moe["run_dir"]) as reader:
        _, router_z = reader.signal(keys.MOE_ROUTER_Z)
    assert len(router_z) == TINY_RUN["steps"] and moe["router_z"] == pytest.approx(float(np.median(router_z)))
    assert 1.0 <= moe["load_imbalance"] <= 2.0 and moe["dead_experts"] >= 0  # 4 experts top-2: E/k = 2
    assert all(math.isnan(dense[k]) for k in ("router_z", "load_imbalance", "dead_experts"))
    moe_curve, dense_curve = result.curves
    assert moe_curve.has_router and not dense_curve.has_router


def test_a_second_sweep_on_a_folder_in_use_is_refused(tmp_path, tiny_sweep):
    # the same command started twice: both ran every run, deleted each other's live run folders and recorded end
    # signals read from the other's half-written stores (reviewer V8)
    from keel.proxy.sweep.runner import sweep_lock

    with sweep_lock(tmp_path / "sweep"):
        with pytest.raises(ValueError, match=r"is in use by another keel sweep .*allowed: wait for it to end"):
            run_sweep(tiny_sweep(), tmp_path / "sweep", workers=1)
    assert run_sweep(tiny_sweep(), tmp_path / "sweep", workers=1).rows  # free again once the first ends


def test_errored_runs_are_run_again_only_when_asked(tmp_path, tiny_sweep):
    # a resume counted errored runs (a worker that died, a recipe fixed since) as finished, with no way to retry them
    # (reviewer V22)
    from keel.proxy.sweep.store import SweepStore

    config = tiny_sweep()
    first = run_sweep(config, tmp_path / "sweep", workers=1)
    run_id = first.rows[0]["run_id"]
    with SweepStore(tmp_path / "sweep") as store:
        store._conn.execute("UPDATE runs SET status = 'error' WHERE run_id = ?", (run_id,))
    assert run_sweep(config, tmp_path / "sweep", workers=1).ran == []
    again = run_sweep(config, tmp_path / "sweep", workers=1, retry_errors=True)
    assert again.ran == [run_id] and {r["status"] for r in again.rows} <= {"done", "diverged"}


def test_a_sweep_with_other_run_settings_is_not_added_to_a_sweep_folder(tmp_path, tiny_sweep):
    # Reviewer W (session 15, W1): `keel sweep --recipes baseline --steps 60 --out D`, then `keel sweep --recipes
    # qk_norm_z_loss --steps 5 --out D` added the 5-step runs to D's table beside the 60-step ones, rc 0:
    # qk_norm_z_loss read "0.1x vs base", and D's stored grid still named the baseline alone.
    run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2]), tmp_path, workers=1)
    other = tiny_sweep(recipes=["qk_norm_z_loss"], lrs=[1e-2], steps=2)
    refusal = r"train with steps=4, .*asks for steps=2: .*allowed: the same run settings.*or another --out"
    with pytest.raises(ValueError, match=refusal):
        run_sweep(other, tmp_path, workers=1)
    assert [r["run_id"] for r in load_sweep(tmp_path).rows] == ["baseline/tiny/lr=0.01/seed=0"]


def test_a_sweep_with_the_same_run_settings_adds_its_grid_points_to_the_folder(tmp_path, tiny_sweep):
    run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2]), tmp_path, workers=1)
    result = run_sweep(tiny_sweep(recipes=["qk_norm"], lrs=[3e-3]), tmp_path, workers=1)
    assert len(result.rows) == 2 and result.ran == ["qk_norm/tiny/lr=0.003/seed=0"]
    with SweepStore(tmp_path, readonly=True) as store:
        grid = store.meta()["sweep"]
    assert grid["recipes"] == ["baseline", "qk_norm"] and grid["lrs"] == [3e-3, 1e-2]  # what the folder holds


def test_a_refused_resume_leaves_the_stored_grid_as_it_was(tmp_path, tiny_sweep):
    run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2]), tmp_path, workers=1)
    with sqlite3.connect(tmp_path / "sweep.sqlite") as conn:  # the run as another version of its recipe made it
        conn.execute("UPDATE runs SET config = '{}'")
    with pytest.raises(ValueError, match="allowed: the same settings to resume"):
        run_sweep(tiny_sweep(recipes=["baseline"], lrs=[1e-2, 3e-2]), tmp_path, workers=1)
    with SweepStore(tmp_path, readonly=True) as store:
        assert store.meta()["sweep"]["lrs"] == [1e-2]
