"""Damaged run stores through every reader verb: one clear error or a note, never a traceback, never a write.

A run store that was truncated (a disk filled up, a copy cut short), emptied, overwritten with text, bit-flipped,
locked by a writer, or filled with hostile rows (NaN, int64 steps, markup and terminal escapes in every text
column) goes through `keel doctor`, `keel report` and `keel export`. Each answers with exit status 0 or 2 and at
most one stderr line, and leaves every file of the run exactly as it was (hashed before and after).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from keel.store import RunWriter
from tests.test_cli_bad_input import run_cli

HOSTILE = "<script>alert(1)</script>\x1b[2J\nforged line\u202e"


def _good(root: Path) -> Path:
    run = root / "good"
    with RunWriter(run) as w:
        for step in range(40):
            w.add_signals(step, {"loss": 2.0 - step / 40, "grad/norm": 1.0})
    return run


def _hashes(folder: Path) -> dict[str, str]:
    # SQLite may leave an empty -wal and a -shm beside a store opened read-only; the store itself is compared
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-shm", "-wal"))
    }


def _sql(statements: str):
    def damage(store: Path) -> None:
        conn = sqlite3.connect(store)
        conn.executescript(statements)
        conn.commit()
        conn.close()

    return damage


def _flip(seed: int):
    def damage(store: Path) -> None:
        data = bytearray(store.read_bytes())
        rng = random.Random(seed)
        for _ in range(8):
            data[rng.randrange(100, len(data))] ^= 1 << rng.randrange(8)
        store.write_bytes(bytes(data))

    return damage


DAMAGE = {
    "zero bytes": lambda s: s.write_bytes(b""),
    "header only": lambda s: s.write_bytes(s.read_bytes()[:100]),
    "cut in half": lambda s: s.write_bytes(s.read_bytes()[: s.stat().st_size // 2]),
    "text": lambda s: s.write_text("step,loss\n0,1.0\n"),
    "bit flips": _flip(0),
    "hostile rows": _sql(
        "INSERT INTO signals(step, key, value) VALUES (9223372036854775807, 'loss', 1e308), (-5, 'loss', NULL);"
        f"INSERT INTO signals(step, key, value) VALUES (3, '{HOSTILE}', 1.0);"
        f"UPDATE meta SET value = '\"{HOSTILE}\"' WHERE key = 'status';"
    ),
    "no signals table": _sql("DROP TABLE signals;"),
    "meta not JSON": _sql("UPDATE meta SET value = '{not json';"),
}
SLOW_DAMAGE = {**{f"bit flips, seed {seed}": _flip(seed) for seed in range(1, 25)}}


def _verbs(run: Path, out: Path) -> list[list[str]]:
    return [
        ["doctor", str(run)],
        ["doctor", str(run / "run.sqlite"), "--json"],
        ["report", str(run), "-o", str(out / "report.html")],
        ["export", str(run), "--format", "jsonl", "--out", str(out / "export")],
    ]


def _check(tmp_path: Path, name: str, damage, capsys) -> dict[str, str]:
    run = tmp_path / name.replace(" ", "_").replace(",", "")
    shutil.copytree(_good(tmp_path) if not (tmp_path / "good").exists() else tmp_path / "good", run)
    damage(run / "run.sqlite")
    before = _hashes(run)
    wrong = {}
    for argv in _verbs(run, tmp_path / f"{run.name}_out"):
        code, out, err = run_cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        if code not in (0, 2) or len(lines) > 1 or "Traceback" in err or "internal error" in err:
            wrong[f"{name}: keel {argv[0]}"] = f"exit {code}: {err[:300]}"
        if argv[0] == "report" and code == 0 and "<script>alert" in Path(argv[3]).read_text():
            wrong[f"{name}: keel report"] = "a stored <script> reached the page as markup"
        if _hashes(run) != before:
            wrong[f"{name}: keel {argv[0]}"] = "changed the run's files"
    return wrong


def test_a_damaged_store_is_one_error_line_or_a_note_and_stays_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    monkeypatch.setattr("keel.report.page.plotly_js", lambda: ("/* plotly */", "0"))  # 3.6 MB not under test
    wrong = {}
    for name, damage in DAMAGE.items():
        wrong |= _check(tmp_path, name, damage, capsys)
    assert wrong == {}


def test_a_store_locked_by_a_writer_is_still_read(tmp_path, monkeypatch, capsys):
    """A live run holds its store; `keel doctor`/`report`/`export` read what is committed, never wait or fail."""
    monkeypatch.setattr("keel.report.page.plotly_js", lambda: ("/* plotly */", "0"))
    run = _good(tmp_path)
    writer = sqlite3.connect(run / "run.sqlite", timeout=0)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        for argv in _verbs(run, tmp_path / "out"):
            code, _, err = run_cli(argv, capsys)
            assert code in (0, 2) and err.count("\n") <= 1 and "Traceback" not in err, (argv, err)
    finally:
        writer.rollback()
        writer.close()


@pytest.mark.slow
def test_many_bit_flipped_stores_are_one_error_line_or_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    monkeypatch.setattr("keel.report.page.plotly_js", lambda: ("/* plotly */", "0"))
    wrong = {}
    for name, damage in SLOW_DAMAGE.items():
        wrong |= _check(tmp_path, name, damage, capsys)
    assert wrong == {}


@pytest.mark.slow  # matplotlib renders four figures: 3-6 s
def test_a_sweep_without_gradient_norms_is_summarized_with_its_plots(tmp_path, capsys):
    """`keel sweep --summarize` of a sweep whose runs logged no gradient norm ended in matplotlib's "Data cannot
    be log-scaled because all values are <= 0" (exit 2, no plots) while drawing the scaling figure's log axis."""
    from tests.report.stores import make_sweep_store

    sweep = tmp_path / "sweep"
    make_sweep_store(sweep)
    before = _hashes(sweep)
    code, out, err = run_cli(["sweep", "--summarize", "--out", str(sweep), "--plots", str(tmp_path / "plots")], capsys)
    assert (code, err) == (0, ""), err
    assert (tmp_path / "plots" / "scaling.png").stat().st_size > 0
    assert _hashes(sweep) == before


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\xff" * 200, b"not a database"])
def test_a_damaged_sweep_store_is_one_error_line_naming_the_file_once(tmp_path, capsys, content):
    """`keel sweep --summarize` wrapped keel's own store error in the path again: "P: P: this sweep store…"."""
    store = tmp_path / "sweep" / "sweep.sqlite"
    store.parent.mkdir()
    store.write_bytes(content)
    code, out, err = run_cli(["sweep", "--summarize", "--no-plots", "--out", str(store.parent)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.count(str(store)) == 1, err
    assert store.read_bytes() == content


@pytest.mark.parametrize("lr", [0.0, -1e308, float("inf")])
def test_a_sweep_run_whose_stored_lr_is_not_a_positive_number_is_left_out_and_counted(tmp_path, capsys, lr):
    """A sweep store row with lr <= 0 made `keel sweep --summarize` fail with "lrs=[-1e+308]; allowed: distinct
    numbers > 0" (naming a value the user never typed); the reader now leaves the row out and says so."""
    import sqlite3

    from keel.store import SweepReader
    from tests.report.stores import make_sweep_store

    sweep = tmp_path / "sweep"
    make_sweep_store(sweep)
    conn = sqlite3.connect(sweep / "sweep.sqlite")
    conn.execute("UPDATE runs SET lr = ? WHERE rowid = 1", (lr,))
    conn.commit()
    conn.close()
    with SweepReader(sweep) as reader:
        rows = reader.rows()
        assert all(row["lr"] > 0 for row in rows) and len(rows) == 7
        assert any("lr" in p and "allowed: a finite number > 0" in p for p in reader.problems), reader.problems
    code, _, err = run_cli(["sweep", "--summarize", "--no-plots", "--out", str(sweep)], capsys)
    assert (code, err) == (0, ""), err
