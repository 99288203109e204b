"""CSVs written with ``na_rep="NaN"`` (pandas ``DataFrame.to_csv``): a column logged every k steps is padded with
NaN in the rows between. Outside-in: a merged history (loss every 10 steps, lr every step) written by pandas.

Decided: in a CSV, a NaN cell of a column whose finite values lie on a lattice of steps (every k ≥ 2 steps, at least
3 of them) and that falls off that lattice is padding — not logged. A NaN on the lattice (the run's own step) stays
a NaN loss; so does any NaN of a column logged every step; ±inf is never padding.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.doctor import examine_log, read_log


def _write(path, rows, names=("step", "lr", "loss", "grad_norm")):
    path.write_text(",".join(names) + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))


def _padded(n=400, every=10, nan_at=()):
    rows = []
    for s in range(n):
        logged = s % every == 0
        loss = "NaN" if not logged or s in nan_at else 3 - s / n
        rows.append((s, 1e-3, loss, 1.0 if logged else "NaN"))
    return rows


def test_nan_padding_between_a_columns_logged_steps_is_not_logged(tmp_path):
    # was: 360 critical non-finite findings on a healthy run
    path = tmp_path / "history.csv"
    _write(path, _padded())
    result = examine_log(path)
    assert not [f for f in result.findings if f.severity in ("warning", "critical")]
    log = read_log(path)
    assert len(log.records.columns["loss"].rows) == 40
    assert any("na_rep" in note for note in log.notes)


def test_a_nan_at_a_logged_step_of_a_padded_column_stays_a_nan_loss(tmp_path):
    path = tmp_path / "history.csv"
    _write(path, _padded(nan_at=(200,)))
    loss = read_log(path).records.columns["loss"]
    assert len(loss.rows) == 40 and math.isnan(loss.values[20])
    assert any(f.severity == "critical" and f.step == 200 for f in examine_log(path).findings)


@pytest.mark.parametrize("cell", ["NaN", "inf"])
def test_a_column_logged_every_step_keeps_its_nans_and_infs(tmp_path, cell):
    path = tmp_path / "log.csv"
    _write(path, [(s, 1e-3, cell if s in (50, 51) else 2.0, 1.0) for s in range(100)])
    loss = read_log(path).records.columns["loss"]
    assert len(loss.rows) == 100 and not math.isfinite(loss.values[50])


@settings(max_examples=60, deadline=None)
@given(
    every=st.integers(1, 7),
    n=st.integers(1, 60),
    real_nans=st.sets(st.integers(0, 59), max_size=4),
    infs=st.sets(st.integers(0, 59), max_size=2),
)
def test_only_nan_cells_off_a_lattice_are_left_out(tmp_path_factory, every, n, real_nans, infs):
    path = tmp_path_factory.mktemp("pad") / "log.csv"
    rows = []
    for s in range(n):
        value = "inf" if s in infs else "NaN" if s % every or s in real_nans else 2.0
        rows.append((s, value))
    _write(path, rows, names=("step", "loss"))
    try:
        loss = read_log(path).records.columns["loss"]
    except Exception as exc:  # noqa: BLE001 - only LogReadError is allowed
        assert type(exc).__name__ == "LogReadError"
        return
    kept = dict(zip(loss.rows.tolist(), loss.values.tolist(), strict=True))
    for s in range(n):
        if s in infs:
            assert kept.get(s) == math.inf  # never padding
        elif s % every == 0 and s not in real_nans:
            assert kept.get(s) == 2.0  # every finite value is kept
