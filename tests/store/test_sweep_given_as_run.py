"""A sweep folder given where a run store is read (`keel doctor SWEEP`, `keel export SWEEP`): one line saying it is a
sweep and what reads it. Reviewer W (session 15): doctor said "a folder with no training log in it; looked for …",
export "no keel run store at SWEEP/run.sqlite", and for SWEEP/sweep.sqlite "this run store has no table 'signals'"."""

import pytest

from keel.cli import main
from keel.store import RunReader, StoreError
from tests.report.stores import make_sweep_store


@pytest.fixture
def sweep(tmp_path):
    return make_sweep_store(tmp_path / "sweep")


@pytest.mark.parametrize("name", ["", "sweep.sqlite"])
def test_the_reader_says_a_sweep_is_a_sweep(sweep, name):
    with pytest.raises(StoreError, match=r"sweep: a keel sweep, not a run; allowed: keel report .*sweep/runs/<recipe>"):
        RunReader(sweep / name if name else sweep)


@pytest.mark.parametrize("verb", [["doctor"], ["export", "--format", "csv"]])
@pytest.mark.parametrize("name", ["", "sweep.sqlite"])
def test_doctor_and_export_say_it_in_one_line(sweep, verb, name, capsys):
    target = str(sweep / name if name else sweep)
    assert main([verb[0], target, *verb[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a keel sweep, not a run; allowed: keel report" in err, err
