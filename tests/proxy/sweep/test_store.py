import math
import sqlite3

import pytest

from keel.proxy.sweep import RunResult, SweepConfig, SweepStore, expand_grid
from keel.proxy.sweep.store import _config_json
from keel.proxy.trainer import TrainConfig


def test_rows_round_trip_with_nan_and_status(tmp_path):
    specs = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3, 1e-2], sizes=["tiny"]))
    with SweepStore(tmp_path) as store:
        assert store.add_runs(specs, lambda rid: tmp_path / rid) == 2
        assert store.add_runs(specs, lambda rid: tmp_path / rid) == 0  # already there: nothing new
        store.mark_running(specs[0].run_id)
        store.record(
            RunResult(
                run_id=specs[0].run_id,
                status="diverged",
                init_loss=5.5,
                val_loss=math.nan,
                max_attn_logit=1e5,
                n_params=123,
                steps_done=3,
                error="non-finite",
            )
        )
        assert store.unfinished([s.run_id for s in specs]) == [specs[1].run_id]
    with SweepStore(tmp_path, readonly=True) as reader:
        first, second = reader.rows()
    assert first["status"] == "diverged" and math.isnan(first["val_loss"]) and first["max_attn_logit"] == 1e5
    assert first["attempts"] == 1 and first["n_params"] == 123 and first["config"]["lr"] == 1e-3
    assert first["run_dir"] == str(tmp_path / specs[0].run_id) and first["finished"] >= first["started"]
    assert second["status"] == "pending" and second["attempts"] == 0


def test_resuming_with_other_settings_for_the_same_grid_point_raises(tmp_path):
    with SweepStore(tmp_path) as store:
        store.add_runs(
            expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"], base=TrainConfig(steps=10))),
            lambda rid: tmp_path / rid,
        )
        with pytest.raises(ValueError, match="allowed: the same settings to resume, or a new sweep dir"):
            store.add_runs(
                expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"], base=TrainConfig(steps=20))),
                lambda rid: tmp_path / rid,
            )


def test_a_sweep_stored_before_the_trainer_had_hooks_resumes(tmp_path):
    # The config row of baseline/tiny/lr=0.001/seed=0 as a sweep of the default settings stored it before
    # TrainConfig had hook fields: the same grid point must match it, or resuming that sweep would be refused.
    stored = (
        '{"batch_size": 16, "beta2": 0.95, "eval_batches": 8, "lr": 0.001, "max_grad_norm": 1.0, '
        '"min_lr_ratio": 0.01, "optimizer": "adamw", "qk_norm": false, "seed": 0, "seq_len": 64, '
        '"size": "tiny", "stabilize": [], "steps": 300, "warmup": 20, "weight_decay": 0.0, "z_loss": 0.0}'
    )
    (spec,) = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"]))
    with SweepStore(tmp_path) as store:
        store.add_runs([spec], lambda rid: tmp_path / rid)
        store._conn.execute("UPDATE runs SET config = ?", (stored,))  # as the older keel wrote it
        store._conn.commit()
        assert store.add_runs([spec], lambda rid: tmp_path / rid) == 0  # the same run: nothing new, no error


def test_readonly_store_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no keel sweep store"):
        SweepStore(tmp_path / "none", readonly=True)


# The runs table as keel wrote it before the sweep carried the router's end signals (router_z, load_imbalance,
# dead_experts): a sweep store from then must still open, resume and read.
OLD_RUNS_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, recipe TEXT NOT NULL, size TEXT NOT NULL, lr REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL, config TEXT, init_loss REAL, final_loss REAL, val_loss REAL, max_attn_logit REAL,
    log_z REAL, grad_norm REAL, n_params INTEGER, steps_done INTEGER, wall_s REAL, error TEXT,
    run_dir TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, started REAL, finished REAL
);
"""


def _old_store(tmp_path, specs):
    conn = sqlite3.connect(tmp_path / "sweep.sqlite")
    conn.executescript(OLD_RUNS_DDL)
    conn.execute(
        "INSERT INTO runs (run_id, recipe, size, lr, seed, status, config, val_loss, run_dir) "
        "VALUES (?, ?, ?, ?, ?, 'done', ?, 2.5, ?)",
        (specs[0].run_id, "baseline", "tiny", specs[0].lr, 0, _config_json(specs[0].config), specs[0].run_id),
    )
    conn.commit()
    conn.close()


def test_a_store_written_before_the_router_columns_reads_them_as_nan(tmp_path):
    specs = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"]))
    _old_store(tmp_path, specs)
    with SweepStore(tmp_path, readonly=True) as store:  # read-only: nothing added to the file
        (row,) = store.rows()
    assert row["val_loss"] == 2.5
    assert all(math.isnan(row[name]) for name in ("router_z", "load_imbalance", "dead_experts"))


def test_a_store_written_before_the_router_columns_resumes_and_records_them(tmp_path):
    specs = expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3, 1e-2], sizes=["tiny"]))
    _old_store(tmp_path, specs)
    with SweepStore(tmp_path) as store:  # opened for writing: the missing columns are added
        assert store.add_runs(specs, lambda rid: tmp_path / rid) == 1  # the old row is the same run
        store.record(
            RunResult(
                run_id=specs[1].run_id, status="done", val_loss=2.4, router_z=12.5, load_imbalance=1.5, dead_experts=1.0
            )
        )
    with SweepStore(tmp_path, readonly=True) as store:
        old, new = store.rows()
    assert math.isnan(old["router_z"]) and old["val_loss"] == 2.5
    assert (new["router_z"], new["load_imbalance"], new["dead_experts"]) == (12.5, 1.5, 1.0)
    with SweepStore(tmp_path) as store:  # a second open finds the columns there and adds nothing
        assert len(store.rows()) == 2
