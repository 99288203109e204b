"""The columnar doctor finds exactly what the record-based one found (issue 12, item 13).

The reference is the old path, frozen in `keel.harness.bench._doctor_legacy`: CSVs are read by both readers; logs of
the other formats are read once (their readers only changed where their records go) and run through both
timelines, drivers and summaries. Equal means the whole ``DoctorResult.to_dict()``: every finding with its
value, baseline and evidence, in order, and every summary field (but the count of a run store's decisions,
which the old path did not have).

One difference is by design and kept out of the generated logs: the members of a per-parameter family are
listed in the order the log first names them, where the old path listed them in each record's own order
(the same thing, unless a log names them in a different order on different lines). And one step came after the
old path and is left out of the comparison: reading a non-finite gradient the log shows was skipped as a loss-scale
overflow (`keel.doctor.overflows`, tested on its own in tests/doctor/test_real_trl_logs.py).
"""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keel.detect import DivergenceConfig, DivergenceDetector, SpikeConfig, SpikeDetector, default_detectors
from keel.doctor import DoctorResult, LogReadError, RawLog, examine, examine_log, read_log
from keel.harness.bench import _doctor_legacy as legacy
from tests.conftest import observe_poisoned_run

DATA = Path(__file__).parent / "data"
REALRUNS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "realruns"
REAL_CSVS = sorted(REALRUNS.glob("*.csv"))


def _same(new, old):
    a, b = new.to_dict(), old.to_dict()
    a["summary"].pop("decisions", None)  # a run store's decisions came after the old path: not in its summary
    assert a["findings"] == b["findings"]
    assert list(a["summary"]) == list(b["summary"])
    for key in a["summary"]:
        assert a["summary"][key] == b["summary"][key], key
    assert list(a["summary"]["signals"]) == list(b["summary"]["signals"])


def _legacy_log(log: RawLog) -> legacy.RawLog:
    return legacy.RawLog(
        source=log.source,
        format=log.format,
        records=list(log.records),
        step_column=log.step_column,
        text_columns=list(log.text_columns),
        notes=list(log.notes),
        keyed=log.keyed,
        stored_findings=log.stored_findings,
        meta=log.meta,
        rollbacks=log.rollbacks,
    )


@pytest.mark.skipif(not REAL_CSVS, reason=f"real-run logs not found at {REALRUNS}")
@pytest.mark.parametrize("path", REAL_CSVS, ids=lambda p: p.name)
def test_real_run_csvs_give_the_same_result_as_the_record_based_reader(path):
    _same(examine_log(path), legacy.examine_csv(path))


@pytest.mark.parametrize("name", ["tb_simple", "tb_tensor", "hf_out"])
def test_fixture_logs_give_the_same_result_through_both_timelines(name):
    log = read_log(DATA / name)
    _same(examine(log), legacy.examine(_legacy_log(log)))


def test_a_guard_store_gives_the_same_result_through_both_timelines(tmp_path):
    observe_poisoned_run(tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert log.stored_findings
    _same(examine(log), legacy.examine(_legacy_log(log)))


# --- generated logs ------------------------------------------------------------------------------------------


def _small_detectors():
    """The defaults plus detectors with short windows, so that logs of a few dozen rows have findings."""
    return [
        *default_detectors(),
        SpikeDetector(
            SpikeConfig(signal="loss", window=8, min_history=4, patience=2, rebase_after=6, kind="small_loss_spike")
        ),
        SpikeDetector(
            SpikeConfig(signal="grad/norm", log_scale=True, window=8, min_history=4, kind="small_grad_spike")
        ),
        DivergenceDetector(DivergenceConfig(short=5, min_history=6, patience=2)),
    ]


@pytest.fixture(autouse=True)
def without_the_overflow_reading(monkeypatch):
    """The old path had no offline loss-scale-overflow reading: compare the timelines, drivers and summaries."""
    import sys

    monkeypatch.setattr(sys.modules["keel.doctor.examine"], "skipped_overflows", lambda findings, timeline: findings)


@pytest.fixture
def often_checkpointed(monkeypatch):
    """Detector checkpoints every 4 observations in both drivers, and only the newest 2 kept dense in the new
    one, so short logs exercise rewinds from thinned-out checkpoints."""
    import sys

    monkeypatch.setattr(sys.modules["keel.doctor.examine"], "CHECKPOINT_EVERY", 4)
    monkeypatch.setattr(sys.modules["keel.doctor.examine"], "RECENT_CHECKPOINTS", 2)
    monkeypatch.setattr(legacy, "CHECKPOINT_EVERY", 4)


STEP_NAMES = ["step", "global_step", "Step", "iteration", "it"]
COLUMN_NAMES = [
    "loss",
    "train_loss",
    "Loss",
    "lm loss",
    "grad_norm",
    "grad-norm",
    "gradient_norm",
    "lr",
    "learning_rate",
    "eval_loss",
    "val/loss",
    "epoch",
    "tokens",
    "note",
    "date",
    "",
    " padded ",
    "grad_norm/fc1",
    "loss/aux",
    "ünïcode",
]
NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=0.5, max_value=5.0).map(lambda x: f"{x:.3g}"),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e3",
            " 2.5 ",
            "1_000",
            "overflow",
            "x",
            "2024-01-01",
            "0",
            "-0.0",
            "500",
            "+3",
        ]
    ),
)
STEP_TEXT = st.one_of(st.integers(-5, 80).map(str), st.sampled_from(["", "x", "2.5", "3.0", "1e1", " 7 ", "nan"]))


@st.composite
def messy_csvs(draw):
    names = draw(
        st.lists(st.sampled_from(COLUMN_NAMES), min_size=1, max_size=6, unique_by=lambda n: n.strip() or object())
    )  # repeated names are read differently now
    header = names[:]
    step_name = draw(st.sampled_from(STEP_NAMES))
    header.insert(draw(st.integers(0, len(header))), step_name)
    steps_increasing = draw(st.booleans())
    rows, step = [], 0
    for _ in range(draw(st.integers(0, 40))):
        step += draw(st.sampled_from([1, 1, 1, 2, 10, 0, -3])) if steps_increasing else draw(st.integers(-2, 3))
        cells = [draw(NUMBER_TEXT) for _ in header]
        cells[header.index(step_name)] = str(step) if draw(st.integers(0, 9)) else draw(STEP_TEXT)
        width = len(cells) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        rows.append(cells[:width] + ["9"] * (width - len(cells)))
        if draw(st.integers(0, 15)) == 0:
            rows.append([])  # a blank line
    buf = io.StringIO()
    writer = csv.writer(
        buf,
        delimiter=draw(st.sampled_from([",", "\t", ";"])),
        lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
    )
    writer.writerow(header)
    writer.writerows(rows)
    text = ("\ufeff" if draw(st.booleans()) else "") + buf.getvalue()
    return text.encode()


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=messy_csvs())
# Inputs found by long random runs (CI's derandomized draws do not reach them):
@example(data=b"step,loss\n0,0.0\n\n,,9")  # a row blank but for a cell past the header's width has no step
@example(data=b"step,loss\n0,\x1c2.0\n\x1c1,3.0\n2,2.0\n")  # str.strip removes \x1c, float() does not
def test_generated_messy_csvs_give_the_same_result_as_the_record_based_reader(
    data, tmp_path_factory, often_checkpointed
):
    path = tmp_path_factory.mktemp("csv") / "log.csv"
    path.write_bytes(data)
    try:
        old = legacy.examine(legacy.read_csv_log(path), detectors=_small_detectors)
    except LogReadError:
        with pytest.raises(LogReadError):
            examine_log(path, detectors=_small_detectors)
        return
    except Exception:  # the old path crashed (a detector's bug, a csv.Error): the new one must not
        assert isinstance(_result_or_error(path), (DoctorResult, LogReadError))
        return
    _same(examine_log(path, detectors=_small_detectors), old)


def _result_or_error(path):
    try:
        return examine_log(path, detectors=_small_detectors)
    except LogReadError as exc:
        return exc


KEYS = [
    "loss",
    "grad/norm",
    "grad/norm/fc1.weight",
    "grad/norm/fc2.weight",
    "lr",
    "lr/1",
    "eval_loss",
    "epoch",
    "logits/softmax_collapse",
    "act/max_abs/blocks.0",
    "act/max_abs/blocks.1",
    "act/max_abs",
]
VALUES = st.one_of(
    st.sampled_from([1.0, 2.0, 2.0, 2.0, 2.05, 1.95, 30.0, math.nan, math.inf, -math.inf, 0.0, -0.0, 0.3]),
    st.floats(min_value=1.5, max_value=2.5),
)


@st.composite
def messy_records(draw):
    records, step = [], draw(st.integers(-3, 3))
    for _ in range(draw(st.integers(1, 60))):
        step += draw(st.sampled_from([1, 1, 1, 0, 0, 5, -4]))
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True))
        keys.sort(key=KEYS.index)  # the same order on every line (see the module docstring)
        records.append((step, {k: draw(VALUES) for k in keys}))
    return records


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=messy_records(),
    keyed=st.booleans(),
    rollbacks=st.dictionaries(st.integers(0, 40), st.integers(-2, 40), max_size=3),
)
def test_generated_records_give_the_same_result_through_both_timelines(records, keyed, rollbacks, often_checkpointed):
    log = RawLog(
        source="gen", format="keel_store" if keyed else "jsonl", records=records, keyed=keyed, rollbacks=rollbacks
    )
    # the records come back as they were (NaN and -0.0 too; a record's keys in the table's column order)
    assert repr([(s, sorted(v.items())) for s, v in log.records]) == repr([(s, sorted(v.items())) for s, v in records])
    try:
        old = legacy.examine(_legacy_log(log), detectors=_small_detectors)
    except Exception:  # a detector's bug crashed the old path; the new one reports it as a finding
        assert isinstance(examine(log, detectors=_small_detectors), DoctorResult)
        return
    _same(examine(log, detectors=_small_detectors), old)


def test_the_generated_logs_have_findings_restarts_and_merges():
    # The comparisons above mean something only if the generated logs exercise what could differ.
    seen = {"findings": 0, "restarts": 0, "merged": 0, "families": 0}

    @settings(max_examples=60, deadline=None, database=None)
    @given(records=messy_records())
    def count(records):
        result = examine(RawLog(source="gen", format="jsonl", records=records), detectors=_small_detectors)
        seen["findings"] += bool(result.findings)
        seen["restarts"] += bool(result.summary["restarts"]["count"])
        seen["merged"] += any("merged" in n for n in result.summary["notes"])
        seen["families"] += bool(result.summary["families"])

    count()
    assert all(v >= 5 for v in seen.values()), seen


def test_json_output_is_the_same(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text(
        "step,loss,grad_norm\n" + "".join(f"{s},{2.0 + 0.01 * (s % 3)},{1.0}\n" for s in range(50)) + "50,nan,inf\n"
    )
    assert json.dumps(examine_log(p).to_dict()) == json.dumps(legacy.examine_csv(p).to_dict())


def test_restarts_far_back_in_a_long_log_rewind_through_thinned_checkpoints(tmp_path):
    # 6,000 steps, then the run resumed from step 100 and, later, from step 3,000: the rewinds start from
    # checkpoints that have been thinned out (the default spacing), and must land where the old driver did.
    import numpy as np

    rng = np.random.default_rng(3)
    steps = list(range(6000)) + list(range(100, 4000)) + list(range(3000, 3500))
    loss = 2.0 * (1 + 0.02 * rng.standard_normal(len(steps)))
    loss[[700, 6500, 9950]] = 9.0  # spikes in each segment
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in zip(steps, loss.tolist(), strict=True)))
    new = examine_log(path)
    assert new.summary["restarts"]["count"] == 2
    assert {700, 600, 3050} <= {f.step for f in new.findings}  # the spike of each segment (rows 700, 6500, 9950)
    _same(new, legacy.examine_csv(path))
