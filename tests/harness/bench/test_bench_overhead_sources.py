"""`keel bench overhead --source-drift EVERY`: the per-source variants exist only when asked, and their loop hands
keel its own per-source losses every step."""

import pytest
import torch

from keel._core import keys
from keel.detect import SourceDriftDetector
from keel.harness.bench.loop import train_steps
from keel.harness.bench.overhead import SOURCES, OverheadConfig, _make_loop, source_drift_watch
from keel.signals import SourceGradientsProbe


def test_the_source_drift_variants_are_timed_only_when_asked_with_the_probes_cadence():
    assert not any(name.startswith("sources") for name in OverheadConfig().variants())
    variants = OverheadConfig(source_drift_every=10).variants()
    assert variants["sources, step losses"] == {SOURCES: 0} and variants["sources + probe/10"] == {SOURCES: 10}


def test_the_step_loss_variant_has_no_probe_and_the_other_one_has_it_at_its_cadence():
    config = OverheadConfig(size="tiny", batch_size=6, seq_len=8)
    probes, detectors, make = source_drift_watch(config, 0)
    assert not any(isinstance(p, SourceGradientsProbe) for p in probes)
    assert sum(isinstance(d, SourceDriftDetector) for d in detectors) == 1
    signals = make(torch.arange(6, dtype=torch.float32))
    assert signals[keys.per_param(keys.SOURCE_STEP_COUNT_PER_SOURCE, "0")] == 2.0
    assert float(signals[keys.per_param(keys.SOURCE_STEP_LOSS_PER_SOURCE, "1")]) == 2.5  # rows 1 and 4
    (probe,) = [p for p in source_drift_watch(config, 7)[0] if isinstance(p, SourceGradientsProbe)]
    assert probe.config.every == 7


class _Steps:
    def __init__(self):
        self.calls = []

    def step(self, loss, **kwargs):
        self.calls.append((float(loss.detach()), kwargs))


def test_train_steps_hands_each_step_the_signals_made_from_its_per_sequence_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    x, y = torch.randint(0, 256, (4, 5)), torch.randint(0, 256, (4, 5))
    seen = []
    guard = _Steps()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_steps(model, opt, [(x, y)], guard, 2, example_signals=lambda losses: seen.append(losses) or {"k": 1.0})
    assert [c[1]["signals"] for c in guard.calls] == [{"k": 1.0}, {"k": 1.0}]
    assert seen[0].shape == (4,) and guard.calls[0][0] == pytest.approx(float(seen[0].detach().mean()), rel=1e-6)


@pytest.mark.slow  # a Guard's first steps on a tiny proxy: seconds on a loaded 2-core machine
def test_the_source_variants_loops_run_under_a_guard_without_a_keel_error():
    config = OverheadConfig(size="tiny", batch_size=6, seq_len=8, steps=2, repeats=1, warmup=1, source_drift_every=2)
    for every in (0, 2):
        run = _make_loop(config, {SOURCES: every}, None)
        run(4)
        assert not [f for f in run.guard.findings if f.kind == "keel_error"]
        run.guard.close()
