"""`keel doctor` after the read, on a long log: what the table and the detectors hold, and the progress they show.

Outside-in: a Megatron-LM console of a 3.3M-step pre-training run (h29-D's 1 GB log) logs the same 9 fields on every
step; its table held each column's row numbers 0, 1, 2 … once per column, and each scanning detector copied its
signal into a series of its own. The table and plan below hold them once.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.detect import default_detectors
from keel.detect.non_finite import NonFiniteConfig
from keel.doctor.blocks import Plan
from keel.doctor.examine import CHECKPOINT_EVERY, examine
from keel.doctor.log import RawLog
from keel.doctor.overflows import skipped_overflows
from keel.doctor.table import LogTable, TableBuilder
from keel.doctor.timeline import build_timeline


def _dense_log(steps: int, columns=("lm_loss", "grad_norm", "learning_rate")) -> RawLog:
    rng = np.random.default_rng(0)
    records = [(s, {c: 2.0 + 0.01 * float(rng.standard_normal()) for c in columns}) for s in range(1, steps + 1)]
    return RawLog(source="x", format="megatron", records=records)


def _row_bytes(table: LogTable) -> int:
    """Bytes of the distinct row-number arrays the table holds."""
    return sum(rows.nbytes for rows in {id(c.rows): c.rows for c in table.columns.values()}.values())


def test_a_dense_logs_row_numbers_are_held_once_not_once_per_column():
    # was: 3 columns x 8 bytes per step of row numbers 0, 1, 2 … (each column its own copy)
    table = _dense_log(5000).records
    assert _row_bytes(table) == 5000 * 8
    rows = next(iter(table.columns.values())).rows
    assert rows.tolist() == list(range(5000)) and not rows.flags.writeable


def test_a_scanned_signal_logged_at_every_step_is_not_copied_per_detector():
    # was: every spike / divergence detector held a float64 series of its own (8 bytes per step each)
    timeline = build_timeline(_dense_log(3000))
    plan = Plan(default_detectors(), timeline)
    loss = timeline.signals[keys.LOSS].values
    scanned = [series for series in plan.series.values() if np.shares_memory(series, loss)]
    assert len(scanned) >= 2 and all(not series.flags.writeable for series in scanned)


def test_a_detector_reading_one_dense_key_reads_its_rows_not_a_copy():
    # was: a bool mask and its flatnonzero per detector (8 bytes per step for lr_surge on a dense log)
    timeline = build_timeline(_dense_log(3000))
    plan = Plan(default_detectors(), timeline)
    lr_rows = timeline.signals[keys.LR].rows
    assert any(rows is lr_rows for rows in plan.rows.values())


def test_a_sparse_column_keeps_its_own_row_numbers():
    records = [(s, {"loss": 2.0, **({"eval_loss": 2.5} if s % 10 == 0 else {})}) for s in range(100)]
    log = RawLog(source="x", format="jsonl", records=records)
    assert log.records.columns["eval_loss"].rows.tolist() == list(range(0, 100, 10))
    assert list(log.records) == records


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(allow_nan=True, allow_infinity=True)),
        max_size=40,
    )
)
def test_a_built_table_holds_exactly_the_records_added(values):
    # attack the dense-until-a-gap row numbers: columns starting late, stopping early, with gaps, in any order
    builder = TableBuilder()
    for step, record in enumerate(values):
        builder.add(step, record)
    table = builder.build()
    assert len(table) == len(values)
    for (_, got), want in zip(table, values, strict=True):
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in want)
    for col in table.columns.values():
        assert np.all(np.diff(col.rows) > 0) and len(col.rows) == len(col.values)


def _skipped_by_loop(timeline) -> dict[int, int]:
    """The per-observation loop `skipped_overflows` ran before (the reference it must agree with)."""
    loss, grad = timeline.signals[keys.LOSS], timeline.signals[keys.GRAD_NORM]
    n = len(timeline)
    losses = np.full(n, np.nan)
    losses[loss.rows] = loss.values
    has_loss = np.zeros(n, dtype=bool)
    has_loss[loss.rows] = True
    grad_bad = np.zeros(n, dtype=bool)
    grad_bad[grad.rows] = ~np.isfinite(grad.values)
    skipped, run = {}, 0
    for i in range(n):
        overflow = bool(grad_bad[i]) and has_loss[i] and math.isfinite(losses[i])
        run = run + 1 if overflow else 0
        after = i + 1 < n and has_loss[i + 1] and math.isfinite(losses[i + 1])
        if overflow and after and run < NonFiniteConfig().max_overflows:
            skipped[int(timeline.steps[i])] = run
    return skipped


_VALUE = st.sampled_from([1.0, 2.0, math.nan, math.inf, None])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), _VALUE, _VALUE), min_size=1, max_size=40))
def test_overflows_shown_skipped_are_those_the_step_by_step_rule_finds(rows):
    # steps going back (restarts), losses missing, runs of overflows longer than max_overflows
    records = []
    for step, loss, grad in rows:
        record = {"loss": loss, "grad_norm": grad}
        records.append((step, {k: v for k, v in record.items() if v is not None} or {"other": 0.0}))
    timeline = build_timeline(RawLog(source="x", format="jsonl", records=records))
    if keys.LOSS not in timeline.signals or keys.GRAD_NORM not in timeline.signals:
        return
    want = _skipped_by_loop(timeline)
    findings = [_grad_nan(int(step)) for step in timeline.steps.tolist()]
    got = {f.step: f.evidence["consecutive"] for f in skipped_overflows(findings, timeline) if f.severity == "info"}
    assert got == want


def _grad_nan(step: int):
    from keel._core.finding import Finding

    return Finding(
        step=step, kind="non_finite", severity="critical", signal="grad/norm", evidence={"non_finite": [keys.GRAD_NORM]}
    )


def test_examine_tells_its_progress_over_the_observations_up_to_the_end():
    # was: nothing; `keel doctor` showed its bytes bar at 100 % while the detectors ran (40 % of a big log's time)
    n = 3 * CHECKPOINT_EVERY + 17
    records = [(s, {"loss": 2.0 + 0.001 * (s % 7)}) for s in range(n)]
    records += [(s, {"loss": 2.0}) for s in range(n - 100, n + 50)]  # a restart: the detectors rewind
    told: list[tuple[int, int]] = []
    examine(RawLog(source="x", format="jsonl", records=records), progress=lambda d, t: told.append((d, t)))
    total = n + 150
    assert len(told) >= 4 and all(t == total for _, t in told)
    done = [d for d, _ in told]
    assert done == sorted(done) and done[-1] == total


@pytest.mark.parametrize("steps", [1, 2])
def test_examine_tells_the_end_of_a_tiny_log_too(steps):
    told: list[tuple[int, int]] = []
    examine(
        RawLog(source="x", format="jsonl", records=[(s, {"loss": 2.0}) for s in range(steps)]),
        progress=lambda d, t: told.append((d, t)),
    )
    assert told[-1] == (steps, steps)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["extend", "truncate"]), st.integers(0, 12), st.integers(0, 12)), max_size=30)
)
def test_the_segment_history_as_runs_is_the_history_as_arrays(ops):
    # was: array('q') of every kept observation and of its step (16 B per observation, 53 MB at 3.3M steps)
    from keel.doctor._history import History

    steps = np.arange(0, 3000, 3, dtype=np.int64)  # increasing: any kept observations in order have increasing steps
    history, kept = History(steps), []
    for op, a, b in ops:
        if op == "extend":
            first = (kept[-1] + 1 + a) if kept else a  # after the newest, as the driver keeps them
            history.extend(first, first + b)
            kept += range(first, first + b)
        else:
            keep = min(a, len(kept))
            history.truncate(keep)
            del kept[keep:]
        kept_steps = steps[kept].tolist()
        assert len(history) == len(kept)
        assert history.last_step() == (kept_steps[-1] if kept else None)
        assert [history.step_at(p) for p in range(len(kept))] == kept_steps
        for step in (-1, 0, 1, 3, 50, 51, 399, 2997, 5000):
            assert history.bisect_left(step) == bisect.bisect_left(kept_steps, step)
        for position in range(len(kept) + 1):
            assert [i for first, stop in history.runs_from(position) for i in range(first, stop)] == kept[position:]
