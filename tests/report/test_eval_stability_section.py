"""The report's evaluation-stability table: monotonicity from the stored evals, the recorded rank τ, the verdict."""

from __future__ import annotations

import math
import re

import pytest

from keel._core import keys
from keel._core.rank_correlation import NOISY_RANK_TAU
from keel.report import write_report
from keel.report.eval_stability_section import eval_stability_rows, eval_stability_section, follows_training
from keel.report.run_data import load_run
from keel.store import RunWriter


def _store(run_dir, *, meta_evals, rank_tau=None):
    with RunWriter(run_dir, flush_interval=0.1) as writer:
        writer.set_meta({"status": "finished", "evals": meta_evals})
        for step in range(10):
            writer.add_signals(step, {keys.LOSS: 1.0 / (step + 1)})
        # val_loss falls but for one step; acc goes nowhere; both recorded every 2 steps
        for i, (loss, acc) in enumerate([(3.0, 0.5), (2.0, 0.4), (2.5, 0.6), (1.0, 0.5), (0.5, math.nan)]):
            writer.add_signals(2 * i + 1, {keys.EVAL_PER_NAME + "val_loss": loss, keys.EVAL_PER_NAME + "mc/acc": acc})
        if rank_tau is not None:
            writer.add_signals(9, {keys.EVAL_RANK_TAU_PER_EVAL + "mc/acc": rank_tau})
    return run_dir


def test_rows_give_monotonicity_by_goal_rank_tau_and_verdict(tmp_path):
    run = load_run(
        _store(tmp_path / "a", meta_evals={"val_loss": {"goal": "min"}, "mc": {"goal": "max"}}, rank_tau=0.4)
    )
    rows = {r["key"]: r for r in eval_stability_rows(run)}
    loss, acc = rows[keys.EVAL_PER_NAME + "val_loss"], rows[keys.EVAL_PER_NAME + "mc/acc"]
    # val_loss 3, 2, 2.5, 1, 0.5 against order: 10 pairs, one concordant (2 → 2.5) → τ = −0.8; goal min → +0.8
    assert loss["goal"] == "min" and loss["monotonicity"] == pytest.approx(0.8)
    assert math.isnan(loss["rank_tau"]) and loss["verdict"] == "no per-example scores: rank τ unknown"
    # acc 0.5, 0.4, 0.6, 0.5 (the NaN left out): 3 concordant, 2 discordant (0.5→0.4, 0.6→0.5), one tie in the
    # values (0.5, 0.5): (3 − 2) / √(6 · 5)
    assert acc["monotonicity"] == pytest.approx(1 / math.sqrt(30))
    assert acc["rank_tau"] == 0.4 and "too noisy" in acc["verdict"]


def test_an_eval_without_a_recorded_goal_is_read_as_max_and_says_so(tmp_path):
    run = load_run(_store(tmp_path / "b", meta_evals="not a dict", rank_tau=NOISY_RANK_TAU))
    rows = {r["key"]: r for r in eval_stability_rows(run)}
    loss = rows[keys.EVAL_PER_NAME + "val_loss"]
    assert loss["goal"] == "max (assumed)" and loss["monotonicity"] == pytest.approx(-0.8)
    # at the line: not too noisy; but 0.5, 0.4, 0.6, 0.5 is no trend
    assert rows[keys.EVAL_PER_NAME + "mc/acc"]["verdict"] == "ranks checkpoints, not in training order"


@pytest.mark.parametrize(
    ("tau", "n", "expected"),
    [
        (0.8, 5, True),  # z = 3·0.8·√20 / √30 = 1.96
        (0.6, 5, False),  # z = 1.47
        (0.5, 10, True),  # z = 3·0.5·√90 / √50 = 2.01
        (0.3, 10, False),  # z = 1.21
        (1.0, 3, False),  # z = 3·√6 / √22 = 1.57: three checkpoints cannot show a trend at 5 %
        (float("nan"), 10, False),
    ],
)
def test_follows_training_is_kendalls_one_sided_test_at_five_percent(tau, n, expected):
    assert follows_training(tau, n) is expected


def test_the_page_shows_the_table_escaped_and_nothing_without_evals(tmp_path):
    _store(tmp_path / "runs" / "evil<b>", meta_evals={"mc": {"goal": "<script>"}}, rank_tau=0.2)
    page = write_report([tmp_path / "runs" / "evil<b>"], tmp_path / "report.html").read_text()
    table = re.search(r"<h2>Evaluation stability</h2><table class='eval-stability'>(.*?)</table>", page, re.S)
    assert table is not None and "evil&lt;b&gt;" in table.group(1) and "<script>" not in table.group(1)
    assert eval_stability_section([]) == ""
