import math
import sqlite3
import subprocess
import sys
import time

import pytest

from keel._core import Decision, Finding
from keel.store import RunReader, RunWriter


def test_round_trip(tmp_path):
    finding = Finding(
        step=3,
        kind="loss_spike",
        severity="critical",
        signal="loss",
        value=9.0,
        baseline=2.0,
        evidence={"z": 40.0, "parameters": ["a"]},
        cause="c",
        advice="r",
    )
    with RunWriter(tmp_path) as w:
        w.set_meta({"seed": 1, "config": {"lr": 0.1}})
        for step in range(5):
            w.add_signals(step, {"loss": 2.0 + step, "grad/norm": float("nan") if step == 2 else 1.0})
        w.add_findings([finding])
        w.add_decision(Decision(step=3, action="skip", reason="spike"))
        w.add_snapshot(4, "snap/4", "abc")
    with RunReader(tmp_path) as r:
        assert r.meta() == {"seed": 1, "config": {"lr": 0.1}}
        steps, values = r.signal("loss")
        assert steps.tolist() == [0, 1, 2, 3, 4] and values.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
        _, grad = r.signal("grad/norm")
        assert math.isnan(grad[2]) and grad[3] == 1.0  # NaN survives (stored as NULL)
        assert r.findings() == [finding]
        assert r.findings(min_severity="critical") == [finding]
        assert r.decisions() == [Decision(step=3, action="skip", reason="spike")]
        assert r.snapshots()[0]["path"] == "snap/4"
        assert r.signal_keys() == ["grad/norm", "loss"]


def test_infinities_are_kept(tmp_path):
    with RunWriter(tmp_path) as w:
        w.add_signals(0, {"x": float("inf"), "y": float("-inf")})
    with RunReader(tmp_path) as r:
        assert r.signal("x")[1].tolist() == [float("inf")]
        assert r.signal("y")[1].tolist() == [float("-inf")]


def test_missing_store_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        RunReader(tmp_path / "nope")


def test_reader_does_not_import_torch(tmp_path):
    with RunWriter(tmp_path) as w:
        w.add_signals(0, {"loss": 1.0})
    code = (
        "import sys; from keel.store import RunReader; r = RunReader(sys.argv[1]); "
        "assert r.signal('loss')[1].tolist() == [1.0]; assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_write_failure_never_raises_and_is_counted(tmp_path):
    w = RunWriter(tmp_path)
    w._conn.execute("DROP TABLE signals")  # every later signal insert fails inside the writer thread
    with pytest.warns(Warning, match="could not be written"):
        w.add_signals(0, {"loss": 1.0})
        w.flush()
    w.close()
    assert w.errors == 1


WRITER_SCRIPT = """
import sys, time
from keel.store import RunWriter
w = RunWriter(sys.argv[1], flush_interval=0.05)
w.set_meta({"status": "running"})
step = 0
while True:
    w.add_signals(step, {"loss": float(step), "grad/norm": 1.0})
    step += 1
    time.sleep(0.001)
"""


def test_kill_9_keeps_every_committed_row(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)])
    try:
        committed = 0
        deadline = time.time() + 30
        while committed < 300 and time.time() < deadline:
            time.sleep(0.1)
            try:
                with RunReader(tmp_path) as r:
                    committed = len(r.signal("loss")[0])
            except (FileNotFoundError, sqlite3.OperationalError):
                pass
        assert committed >= 300
    finally:
        proc.kill()  # SIGKILL: no cleanup, no flush
        proc.wait()
    with RunReader(tmp_path) as r:
        steps, values = r.signal("loss")
        assert len(steps) >= committed
        assert steps.tolist() == list(range(len(steps)))  # contiguous: no torn batch
        assert values.tolist() == [float(s) for s in steps]
        assert len(r.signal("grad/norm")[0]) == len(steps)  # both keys of a step land together
        assert r.meta()["status"] == "running"
        assert r._file.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _signal_rows(run_dir):
    """The signals table as stored: rowid order, each value's SQLite type, values by repr (NaN, -0.0 told apart)."""
    conn = sqlite3.connect(run_dir / "run.sqlite")
    try:
        sql = "SELECT rowid, step, key, value, typeof(step), typeof(value) FROM signals ORDER BY rowid"
        return [(*row[:3], repr(row[3]), *row[4:]) for row in conn.execute(sql)]
    finally:
        conn.close()


@pytest.mark.parametrize("length", [0, 1, 199, 200, 201, 450])
def test_a_series_is_stored_as_its_rows_added_one_by_one(tmp_path, length):
    # add_series inserts many rows per statement (a log written whole); the table must hold exactly what adding
    # each (step, value) as its own row holds: same rows, same order, same types (NULL for NaN, -0.0, ±inf, big steps).
    steps = [-(2**61) + 1, 2**61 - 1, *range(length - 2)][:length]
    specials = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-310, 0.1, 2.0**60]
    values = [specials[i % len(specials)] if i % 3 == 0 else 1.0 + i / 7 for i in range(length)]
    with RunWriter(tmp_path / "series") as w:
        w.add_series("loss", steps, values)
        w.add_series("grad/norm", steps[::-1], values)
    with RunWriter(tmp_path / "rows") as w:
        for key, key_steps in (("loss", steps), ("grad/norm", steps[::-1])):
            for step, value in zip(key_steps, values, strict=True):
                w.add_signals(step, {key: value})
    assert _signal_rows(tmp_path / "series") == _signal_rows(tmp_path / "rows")
    assert len(_signal_rows(tmp_path / "series")) == 2 * length
