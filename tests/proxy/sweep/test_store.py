import math

import pytest

from keel.proxy.sweep import RunResult, SweepConfig, SweepStore, expand_grid
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
