"""`keel bench integrations`: the HF and Lightning KeelCallback's step-time cost on a real Trainer, per policy."""

from __future__ import annotations

import importlib.util
import json

import pytest

from keel.cli import main
from keel.harness.bench import integrations as bench
from keel.harness.bench.integrations import CONTROL, IntegrationsBenchConfig

VARIANTS = {"policy=observe", "policy=skip", "policy=recover"}


@pytest.mark.slow  # two real trainers x 5 variants x 3 blocks, ~25 s on the 2-core VM (make test-all)
@pytest.mark.usefixtures("one_torch_thread")
def test_quick_run_times_every_policy_of_both_callbacks_on_real_trainers_beside_the_bare_one(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    assert main(["bench", "integrations", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    quick = IntegrationsBenchConfig.quick()
    assert set(result["frameworks"]) == {"hf", "lightning"}
    for framework, figures in result["frameworks"].items():
        assert set(figures["ratio"]) == set(figures["ratio_steady"]) == set(figures["ratio_cpu"]) == VARIANTS
        assert set(figures["step_ms"]) == VARIANTS | {"bare", CONTROL}
        assert all(len(r) == quick.repeats for r in figures["ratio_repeats"].values())
        assert all(r > 0 for r in [*figures["ratio"].values(), figures["control"]])
        assert set(figures["guard"]) == VARIANTS
        for name, blocks in figures["guard"].items():  # each callback's Guard stepped every update, healthily
            assert [b["steps"] for b in blocks] == [quick.warmup + quick.steps + 1] * quick.repeats, (framework, name)
            assert all(b["actions"] == {} for b in blocks), (framework, name)
        assert all(b["snapshots"] >= 1 for b in figures["guard"]["policy=recover"])  # recover did snapshot
        assert all(b["snapshots"] == 0 for b in figures["guard"]["policy=skip"])


def test_each_ratio_is_the_variant_block_over_the_bare_block_of_the_same_repeat(monkeypatch):
    calls = []

    def block(framework, policy, config, workdir):
        calls.append((framework, policy))
        ms = {None: 10.0, "observe": 11.0, "skip": 12.0, "recover": 15.0}[policy]
        out = {"times": [ms / 1e3] * config.steps, "cpu_times": [ms / 2e3] * config.steps}
        return out | ({} if policy is None else {"guard": {"steps": 1, "actions": {}, "snapshots": 0}})

    monkeypatch.setattr(bench, "time_block", block)
    result = bench.bench_integrations(IntegrationsBenchConfig(frameworks=("lightning",), steps=3, repeats=3))
    figures = result["frameworks"]["lightning"]
    assert figures["ratio"] == pytest.approx({"policy=observe": 1.1, "policy=skip": 1.2, "policy=recover": 1.5})
    assert figures["control"] == pytest.approx(1.0)
    # an untimed warm-up block, then 3 repeats of the 5 variants, rotating which goes first
    assert len(calls) == 1 + 3 * 5 and calls[0] == ("lightning", None)
    assert [c[1] for c in calls[1:6]] != [c[1] for c in calls[6:11]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"frameworks": ("keras",)}, "frameworks=('keras',); allowed: one or more of hf, lightning"),
        ({"frameworks": ()}, "allowed: one or more of hf, lightning"),
        ({"hidden_size": 30}, "hidden_size=30; allowed: a multiple of 4"),
        ({"steps": 0}, "steps"),
        ({"repeats": True}, "repeats"),
    ],
)
def test_bad_settings_are_one_clear_error(fields, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        IntegrationsBenchConfig(**fields)


def test_without_lightning_the_bench_refuses_in_one_line_before_training(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightning" else real(name, *a))
    assert main(["bench", "integrations", "--quick", "--framework", "lightning"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'keel[lightning]'" in err[0], err


def test_an_unknown_framework_is_refused_by_the_cli(capsys):
    assert main(["bench", "integrations", "--framework", "keras"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'keras'" in err[0], err
