import pytest

from keel.detect import OpposingSignalsDetector
from keel.harness.bench.overhead import OPPOSING, OverheadConfig, _make_loop, opposing_signals_watch
from keel.signals import OpposingSignalsProbe


def test_the_opposing_signals_variant_is_timed_only_when_asked_with_its_cadence():
    assert not any(name.startswith("opposing") for name in OverheadConfig().variants())
    assert OverheadConfig(opposing_every=10).variants()["opposing/10"] == {OPPOSING: 10}


@pytest.mark.slow  # builds the proxy's held-out batches: seconds on a loaded 2-core machine
def test_the_opposing_signals_variant_adds_its_probe_and_detector_to_the_defaults():
    probes, detectors = opposing_signals_watch(OverheadConfig(size="tiny", seq_len=8), every=7)
    (probe,) = [p for p in probes if isinstance(p, OpposingSignalsProbe)]
    assert probe.config.every == 7 and probe.config.probe_set[0].shape == (32, 8)
    assert sum(isinstance(d, OpposingSignalsDetector) for d in detectors) == 1 and len(probes) > 1


@pytest.mark.slow  # a Guard's first steps on a tiny proxy: seconds on a loaded 2-core machine
def test_the_opposing_signals_variant_loop_measures_its_probe_set_at_its_cadence():
    config = OverheadConfig(size="tiny", batch_size=2, seq_len=8, steps=2, repeats=1, warmup=1, opposing_every=2)
    run = _make_loop(config, {OPPOSING: 2}, None)
    run(5)  # steps 0..4: measured at 0, 2, 4
    (probe,) = [p for p in run.guard.probes if isinstance(p, OpposingSignalsProbe)]
    assert len(probe._history) == 3 and probe._history[0].shape == (32,)
