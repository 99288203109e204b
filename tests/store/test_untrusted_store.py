"""RunReader treats a store as untrusted input: each value's type is checked, a bad row is left out and counted,
and a file that is not a run store gives one clear StoreError."""

from __future__ import annotations

import math
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel._core import Decision, Finding
from keel.store import RunReader, RunWriter, StoreError

# Every column of every table, with the type the reader requires (None: NULL allowed).
COLUMNS = {
    "meta": {"key": "text", "value": "text"},
    "signals": {"step": "int", "key": "text", "value": "real?"},
    "findings": {
        "step": "int",
        "kind": "text",
        "severity": "text",
        "signal": "text",
        "value": "real?",
        "baseline": "real?",
        "evidence": "text",
        "cause": "text",
        "advice": "text",
    },
    "decisions": {
        "step": "int",
        "action": "text",
        "reason": "text",
        "actor": "text",
        "onset": "int?",
        "restored_step": "int?",
    },
    "snapshots": {"step": "int", "path": "text", "checksum": "text", "created": "real"},
}
GOOD = {
    "meta": ("status", '"finished"'),
    "signals": (1, "loss", 2.5),
    "findings": (1, "loss_spike", "critical", "loss", 9.0, 2.0, '{"z": 4}', "cause", "advice"),
    "decisions": (1, "rollback", "why", "keel", 0, 0),
    "snapshots": (1, "snap/1", "abc", 1.0),
}
PAYLOAD = "1<script>document.title='pwned'</script>"
# A value of the wrong type for each column type: what a crafted store can hold there.
WRONG = {"int": [PAYLOAD, b"<blob>", 1.5, None], "real": [PAYLOAD, b"\x00\xff", None], "text": [7, 2.5, b"<b>", None]}


def crafted_store(path, rows: dict[str, list[tuple]]):
    """A run.sqlite with keel's table and column names but no column types (so nothing converts a value)."""
    path.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path / "run.sqlite")
    for table, columns in COLUMNS.items():
        conn.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
        marks = ", ".join("?" * len(columns))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", [GOOD[table], *rows.get(table, [])])
    conn.commit()
    conn.close()
    return path


def read_all(reader: RunReader) -> dict:
    return {
        "meta": reader.meta(),
        "signals": {k: reader.signal(k) for k in reader.signal_keys()},
        "findings": reader.findings(),
        "decisions": reader.decisions(),
        "snapshots": reader.snapshots(),
    }


def _bad_cells():
    for table, columns in COLUMNS.items():
        for column, kind in columns.items():
            for bad in WRONG[kind.rstrip("?")]:
                if bad is None and kind.endswith("?"):
                    continue  # NULL is allowed there
                yield pytest.param(table, column, bad, id=f"{table}.{column}={bad!r:.12}")


@pytest.mark.parametrize(("table", "column", "bad"), list(_bad_cells()))
def test_a_value_of_the_wrong_type_in_any_column_leaves_out_its_row_and_is_counted(tmp_path, table, column, bad):
    row = list(GOOD[table])
    row[list(COLUMNS[table]).index(column)] = bad
    if table == "meta" and column == "value":
        row[0] = "other"  # its own key, so the good row stays
    crafted_store(tmp_path, {table: [tuple(row)]})
    with RunReader(tmp_path) as reader:
        got = read_all(reader)
        problems = reader.problems
    assert got["meta"] == {"status": "finished"}
    assert [(int(s[0]), float(v[0])) for s, v in got["signals"].values()] == [(1, 2.5)]
    assert [(f.step, f.kind, f.value) for f in got["findings"]] == [(1, "loss_spike", 9.0)]
    assert got["decisions"] == [Decision(step=1, action="rollback", reason="why", onset=0, restored_step=0)]
    assert [s["step"] for s in got["snapshots"]] == [1]
    assert len(problems) == 1 and problems[0].startswith(f"{table}: 1 row(s) of the wrong type left out")
    assert f"{column} is " in problems[0]


@pytest.mark.parametrize(
    ("table", "row", "reason"),
    [
        ("meta", ("bad", "{not json"), "is not JSON"),
        ("meta", ("deep", "[" * 100_000 + "]" * 100_000), "nested too deeply"),
        ("findings", (2, "k", "critical", "loss", 1.0, 1.0, "[1, 2]", "c", "r"), "not a JSON object"),
        ("findings", (2, "k", "critical", "loss", 1.0, 1.0, "{oops", "c", "r"), "evidence is not JSON"),
        (
            "findings",
            (2, "k", "critical'><img src=x>", "loss", 1.0, 1.0, "{}", "c", "r"),
            "severity is \"critical'><img",
        ),
        ("decisions", (2, "<script>", "r", "keel", None, None), "action is '<script>'"),
    ],
)
def test_values_of_the_right_type_but_not_allowed_are_left_out_and_counted(tmp_path, table, row, reason):
    crafted_store(tmp_path, {table: [row]})
    with RunReader(tmp_path) as reader:
        got = read_all(reader)
        assert len(got[table]) == 1 and reader.problems[0].startswith(f"{table}: 1 row(s)")
        assert reason in reader.problems[0]


def test_a_signal_key_that_is_not_text_leaves_out_its_rows(tmp_path):
    crafted_store(tmp_path, {"signals": [(1, b"<blob key>", 1.0), (2, b"<blob key>", 1.0), (1, 5, 1.0)]})
    with RunReader(tmp_path) as reader:
        assert reader.signal_keys() == ["loss"]
        assert reader.problems == [
            "signals: 3 row(s) of the wrong type left out (first: key is 5 (integer); allowed: text)"
        ]


def test_negative_huge_and_infinite_values_of_the_right_type_are_kept(tmp_path):
    crafted_store(tmp_path, {"signals": [(-(2**63), "loss", math.inf), (2**63 - 1, "loss", -1e308)]})
    with RunReader(tmp_path) as reader:
        steps, values = reader.signal("loss")
        assert steps.tolist() == [-(2**63), 1, 2**63 - 1] and values.tolist() == [math.inf, 2.5, -1e308]
        assert reader.problems == []


def test_a_file_that_is_not_sqlite_is_one_store_error_naming_it(tmp_path):
    (tmp_path / "run.sqlite").write_bytes(b"<html>not a database</html>" * 100)
    with pytest.raises(StoreError, match=r"run\.sqlite: not an SQLite run store \(file is not a database\)"):
        RunReader(tmp_path)


def test_a_missing_table_or_required_column_is_one_store_error_naming_it(tmp_path):
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    conn.execute("CREATE TABLE findings (step INTEGER, kind TEXT)")
    conn.commit()
    conn.close()
    with RunReader(tmp_path) as reader:
        assert reader.meta() == {}
        with pytest.raises(StoreError, match="has no table 'signals'"):
            reader.signal_keys()
        with pytest.raises(
            StoreError,
            match="table 'findings' of this run store lacks the column.s. severity, signal, evidence, cause, advice",
        ):
            reader.findings()
    with pytest.raises(sqlite3.OperationalError):  # what callers that handle a broken store already catch
        RunReader(tmp_path).decisions()


def test_a_store_from_before_rollbacks_had_onset_columns_reads_them_as_none(tmp_path):
    with RunWriter(tmp_path) as w:
        w.add_decision(Decision(step=3, action="skip", reason="spike"))
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("DROP TABLE decisions")
    conn.execute("CREATE TABLE decisions (step INTEGER, action TEXT, reason TEXT, actor TEXT)")
    conn.execute("INSERT INTO decisions VALUES (3, 'skip', 'spike', 'keel')")
    conn.commit()
    conn.close()
    with RunReader(tmp_path) as reader:
        assert reader.decisions() == [Decision(step=3, action="skip", reason="spike")]


SQL_VALUES = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.sampled_from(['{"a": 1}', "[]", "critical", "skip", "loss", '"x"', "NaN"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.fixed_dictionaries(
        {table: st.lists(st.tuples(*[SQL_VALUES] * len(columns)), max_size=4) for table, columns in COLUMNS.items()}
    )
)
def test_any_sqlite_values_in_any_column_read_back_typed_or_left_out_never_raise(tmp_path_factory, rows):
    path = crafted_store(tmp_path_factory.mktemp("run"), rows)
    with RunReader(path) as reader:
        got = read_all(reader)
        problems = reader.problems
    assert all(isinstance(k, str) for k in got["meta"])
    for key, (steps, values) in got["signals"].items():
        assert isinstance(key, str) and steps.dtype.kind == "i" and values.dtype.kind == "f"
    for f in got["findings"]:
        assert isinstance(f, Finding) and type(f.step) is int and isinstance(f.evidence, dict)
        assert all(isinstance(x, str) for x in (f.kind, f.signal, f.cause, f.advice))
        assert isinstance(f.value, float) and isinstance(f.baseline, float)
    for d in got["decisions"]:
        assert type(d.step) is int and all(x is None or type(x) is int for x in (d.onset, d.restored_step))
        assert isinstance(d.reason, str) and isinstance(d.by, str)
    for s in got["snapshots"]:
        assert type(s["step"]) is int and isinstance(s["path"], str) and isinstance(s["checksum"], str)
    dropped = {p.split(":")[0]: int(p.split(": ")[1].split(" ")[0]) for p in problems}
    kept = {
        "signals": sum(len(s) for s, _ in got["signals"].values()),
        **{t: len(got[t]) for t in ("findings", "decisions", "snapshots")},
    }
    for table, n in kept.items():  # every row is either read back or counted as left out
        assert n + dropped.get(table, 0) == 1 + len(rows[table]), table
    assert len(got["meta"]) + dropped.get("meta", 0) <= 1 + len(rows["meta"])  # a repeated key is read once
