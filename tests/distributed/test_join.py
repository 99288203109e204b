"""A Guard inside DDP's join context under real torchrun processes (gloo, CPU): keel keeps agreeing across ranks
while every rank still has batches, and each rank decides on its own values only once one has run out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # one torchrun start, six scenarios: ~15 s on 2 cores


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("join")
    torchrun(Path(__file__).with_name("join_worker.py"), str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("scenario", ["even", "generic"])
def test_inside_join_with_even_batches_every_rank_skips_the_nan_step_together(ranks, scenario):
    zero, one = ranks[0][scenario], ranks[1][scenario]
    assert zero["actions"] == one["actions"]
    assert [i for i, a in enumerate(zero["actions"]) if a != "ok"] == [3] and zero["actions"][3] == "skip"
    assert zero["sums"] == one["sums"]  # the replicas never differ, mid-run included
    assert zero["warnings"] == one["warnings"] == []


def test_with_uneven_batches_ranks_agree_until_one_runs_out_then_each_goes_on_alone(ranks):
    zero, one = ranks[0]["uneven"], ranks[1]["uneven"]
    assert len(zero["actions"]) == 4 and len(one["actions"]) == 7  # no hang, no crash
    assert zero["actions"] == one["actions"][:4] == ["ok", "ok", "skip", "ok"]
    assert zero["sums"] == one["sums"][:4]
    assert zero["final"] == one["final"]  # DDP's join hands the last joiner's weights to every rank
    [said] = one["warnings"]
    assert "rank 1: another rank ran out of batches" in said


def test_joins_in_a_row_and_steps_after_them_still_agree_and_close_removes_keels_join_hook(ranks):
    zero, one = ranks[0]["again"], ranks[1]["again"]
    assert zero["actions"] == one["actions"] == ["ok", "skip", "ok", "ok", "ok", "skip", "skip"]
    assert zero["final"] == one["final"]
    assert not zero["hook_left"] and not one["hook_left"]
    assert zero["twins_hook_is_ddps"] and one["twins_hook_is_ddps"]


def test_a_guard_made_inside_the_join_decides_on_each_ranks_own_values_and_says_where_to_make_it(ranks):
    assert [r["inside"]["steps"] for r in ranks] == [3, 5]
    for r in ranks:
        [said] = r["inside"]["warnings"]
        assert "Make the Guard before `with model.join():`" in said


def test_a_guard_refused_at_construction_leaves_no_shadow_in_the_next_guards_join(ranks):
    zero, one = ranks[0]["retried"], ranks[1]["retried"]
    assert zero["refused"] and one["refused"]
    assert zero["actions"] == one["actions"][:4] == ["ok", "ok", "skip", "ok"] and len(one["actions"]) == 6
    assert not zero["hook_left"] and not one["hook_left"]
    assert zero["rank_stats"] and one["rank_stats"]  # the refused Guard's comm hook is the new Guard's
    assert zero["cos_steps"] and zero["cos_steps"][0] == 0  # each rank's gradient cosine, from the first step
