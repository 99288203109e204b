"""`keel bench overhead --signals pref rl`: the cost of an RL loop's ``Guard.step(loss, signals=...)`` and detectors
against ``Guard.step(loss)``, measured like every other overhead variant. No timing thresholds here."""

from __future__ import annotations

import argparse
import json

import pytest

from keel._core import keys
from keel.cli import main
from keel.detect import LikelihoodDisplacementDetector, PolicyEntropyCollapseDetector
from keel.harness.bench.overhead import SIGNALS, OverheadConfig, _make_loop, add_arguments
from keel.harness.bench.overhead import main as overhead_main
from keel.harness.bench.rl_signals import rl_signal_source
from keel.store import RunReader

# what each kind's dict must hold for its preset detectors to have something to read
EXPECTED = {
    "pref": {keys.PREF_CHOSEN_LOGP, keys.PREF_CHOSEN_DISPLACEMENT, keys.PREF_MARGIN, keys.PREF_ACCURACY},
    "rl": {keys.RL_ENTROPY, keys.RL_KL, keys.RL_CLIP_HIGH, keys.RL_ZERO_STD_GROUPS, keys.RM_DISAGREEMENT},
}
PRESET = {"pref": LikelihoodDisplacementDetector, "rl": PolicyEntropyCollapseDetector}


def test_signals_add_one_variant_per_kind_marked_for_the_loop():
    variants = OverheadConfig(signals=("rl", "pref", "rl")).variants()
    assert variants["signals=pref"] == {SIGNALS: "pref"} and variants["signals=rl"] == {SIGNALS: "rl"}
    assert "signals=pref" not in OverheadConfig().variants()


@pytest.mark.parametrize("signals", [("ppo",), "rl", (1,)])
def test_an_unknown_signals_kind_is_one_clear_error(signals):
    with pytest.raises(ValueError, match="OverheadConfig.signals"):
        OverheadConfig(signals=signals)


@pytest.mark.parametrize("kind", ["pref", "rl"])
def test_each_kind_is_a_typical_dict_its_preset_detectors_read(kind):
    detectors, make = rl_signal_source(kind, batch_size=8, seq_len=16)
    signals = make()
    assert EXPECTED[kind] <= set(signals)
    assert all(v.dim() == 0 and v.isfinite() for v in signals.values())
    assert any(isinstance(d, PRESET[kind]) for d in detectors)


# one kind by default (a proxy loop's first steps take seconds on the shared VM); the other in make test-all
@pytest.mark.parametrize("kind", [pytest.param("pref", marks=pytest.mark.slow), "rl"])
def test_the_signals_variant_hands_its_dict_to_every_guard_step(tmp_path, kind):
    config = OverheadConfig(size="tiny", batch_size=4, seq_len=16, steps=3, repeats=1, warmup=1, signals=(kind,))
    loop = _make_loop(config, {SIGNALS: kind}, str(tmp_path))
    loop(3)
    loop.guard.close()
    with RunReader(tmp_path) as run:
        for key in EXPECTED[kind]:
            assert len(run.signal(key)[1]) == 3, key


def test_signals_with_ddp_is_one_clear_error():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--signals has no effect with --ddp"):
        overhead_main(parser.parse_args(["--ddp", "2", "--signals", "rl"]))


@pytest.mark.slow  # four process starts (make test-all); the variant's loop is checked by default above
def test_bench_overhead_json_has_a_ratio_per_signals_kind(capsys):
    argv = ["bench", "overhead", "--json", "--size", "tiny", "--steps", "3", "--repeats", "2", "--rounds", "1"]
    assert main([*argv, "--batch-size", "4", "--seq-len", "16", "--signals", "pref", "rl"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"signals=pref", "signals=rl"} <= set(result["ratio"]) and result["ratio"]["signals=rl"] > 0
    assert set(result["ratio_cpu"]) == set(result["ratio"]) and result["control_cpu"] > 0  # CPU time beside wall
