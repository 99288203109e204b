"""A report of many long runs embeds at most `PAGE_POINTS` points over its charted series (min/max downsampled, so a
one-step spike stays), and a single long run loses nothing to the budget (helper E's E5: 50 runs × 20k steps made a
37 MB page that took Chromium 18.7 s to load)."""

import base64
from pathlib import Path

import numpy as np

from keel.report import page
from keel.report.charts import Chart
from keel.report.run_data import RunData

CHART = Chart(id="c0", base="loss", title="loss", keys=["loss", "grad/norm"], layers=[], log_y=False)


def _runs(n_runs: int, steps: int, spike_at: int) -> list[RunData]:
    runs = []
    for i in range(n_runs):
        x = np.arange(steps)
        loss = 3.0 - 1e-5 * x + 0.001 * i
        loss[spike_at] = 50.0  # one step: min/max keeps it
        series = {"loss": (x, loss), "grad/norm": (x, np.ones(steps)), "lr": (x, np.full(steps, 1e-3))}
        runs.append(RunData(name=f"r{i}", path=Path(f"r{i}"), series=series))
    return runs


def test_many_long_runs_stay_within_the_page_budget_and_keep_a_one_step_spike():
    runs = _runs(n_runs=60, steps=40_000, spike_at=12_345)
    out = page._series(runs, [CHART])
    assert len(out) == 120  # lr is not charted here: never embedded
    assert sum(entry["n"] for entry in out) <= page.PAGE_POINTS
    assert all(entry["n"] >= page.MIN_SERIES_POINTS for entry in out)
    loss = next(e for e in out if e["key"] == "loss" and e["run"] == 7)
    assert np.frombuffer(base64.b64decode(loss["values"]), dtype="<f4").max() == 50.0  # the spike, on the page


def test_one_long_run_is_embedded_whole():
    (run,) = _runs(n_runs=1, steps=40_000, spike_at=5)
    out = page._series([run], [CHART])
    assert [e["n"] for e in out] == [40_000, 40_000]
