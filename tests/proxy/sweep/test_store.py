import math

import pytest

from keel.proxy.sweep import RunResult, SweepConfig, SweepStore, expand_grid


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
            expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"], steps=10)),
            lambda rid: tmp_path / rid,
        )
        with pytest.raises(ValueError, match="allowed: the same settings to resume, or a new sweep dir"):
            store.add_runs(
                expand_grid(SweepConfig(recipes=["baseline"], lrs=[1e-3], sizes=["tiny"], steps=20)),
                lambda rid: tmp_path / rid,
            )


def test_readonly_store_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no keel sweep store"):
        SweepStore(tmp_path / "none", readonly=True)
