"""keel doctor on logs keel wrote itself: a run store's CSV, JSONL and TensorBoard exports give the same
findings as the store."""

import importlib.util

import pytest

from keel.doctor import examine_log
from keel.store.exporters import export_run
from tests.report.stores import make_run_store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run_store(tmp_path_factory.mktemp("export") / "run", steps=300, nan_at=200)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "tensorboard"])
def test_an_exported_run_reads_back_with_the_same_findings(run, tmp_path, fmt):
    if fmt == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        pytest.skip("writing the TensorBoard export needs the tensorboard package (keel[tensorboard])")
    expected = [(f.step, f.kind, f.severity) for f in examine_log(run).findings]
    assert expected == [(150, "loss_spike", "critical"), (200, "non_finite", "critical")]
    paths = export_run(run, fmt, tmp_path / fmt)
    log = next(p for p in paths if p.name.startswith(("signals", "events")))
    result = examine_log(log)
    assert result.format == {"csv": "csv", "jsonl": "jsonl", "tensorboard": "tensorboard"}[fmt]
    assert [(f.step, f.kind, f.severity) for f in result.findings] == expected
    assert result.summary["signals"]["loss"]["observations"] == 300
