import argparse
import json

import pytest

from keel.cli import main
from keel.harness.bench.overhead import CONTROL, OverheadConfig, add_arguments
from keel.harness.bench.overhead import main as overhead_main


def _bench_json(capsys, rounds: int, *extra: str) -> dict:
    assert (
        main(
            [
                "bench",
                "overhead",
                "--json",
                "--size",
                "tiny",
                "--steps",
                "3",
                "--repeats",
                "2",
                "--rounds",
                str(rounds),
                "--batch-size",
                "4",
                "--seq-len",
                "16",
                "--policy",
                "recover",
                *extra,
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # five process starts, ~12 s (make test-all); the config checks below stay in the default suite
def test_bench_overhead_json_has_the_ratios_of_every_variant_each_timed_in_its_own_process(capsys):
    result = _bench_json(capsys, 1, "--watch")
    variants = {"default", "full", "policy=recover", "watch, policy=skip"}
    assert set(result["ratio"]) == set(result["ratio_steady"]) == variants
    assert set(result["step_ms"]) == variants | {"bare"}
    assert all(r > 0 for r in result["ratio"].values())
    assert result["ratio_default"] == result["ratio"]["default"]
    # recover took its snapshots (the first at step 0), in the process that timed it
    assert set(result["snapshots"]) == {"policy=recover"} and result["snapshots"]["policy=recover"]["snapshots"] >= 1
    assert result["isolated"] == "one process per variant"
    assert len(result["control_rounds"]) == 1 and result["control"] > 0  # the A/A control: a second bare process


@pytest.mark.slow  # fresh processes per round: ~10 process starts (make test-all)
def test_each_round_starts_fresh_processes_and_gives_every_variant_and_the_control_a_ratio(capsys):
    result = _bench_json(capsys, rounds=2)
    variants = {"default", "full", "policy=recover"}
    assert {name: len(r) for name, r in result["ratio_rounds"].items()} == dict.fromkeys(variants, 2)
    assert len(result["control_rounds"]) == 2 and result["config"]["rounds"] == 2


@pytest.mark.parametrize("policies", [("yolo",), "recover", (1,)])
def test_an_unknown_policy_is_one_clear_error(policies):
    with pytest.raises(ValueError, match="OverheadConfig.policies"):
        OverheadConfig(policies=policies)


def test_watch_adds_its_variant_whose_loop_stays_bare():
    assert OverheadConfig().variants().keys() == {"bare", "default", "full", "bare, second process"}
    assert OverheadConfig(watch=True).variants()["watch, policy=skip"] == {"policy": "skip", "keel.watch": True}
    # every configuration shipped is timed: keel.watch under recover too (its snapshots and weights check)
    watched = [k for k in OverheadConfig(watch=True, policies=("recover", "skip")).variants() if k.startswith("watch")]
    assert watched == ["watch, policy=skip", "watch, policy=recover"]


def test_watch_with_ddp_is_one_clear_error():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--watch has no effect with --ddp"):
        overhead_main(parser.parse_args(["--ddp", "2", "--watch"]))


@pytest.mark.slow  # every variant compiles its own copy with inductor: ~1 min on 2 cores (make test-all)
def test_a_compiled_bf16_run_times_every_variant_and_policy(capsys):
    result = _bench_json(capsys, 1, "--compile", "--autocast", "bf16")
    assert result["config"]["compile"] and result["config"]["autocast"] == "bf16"
    assert set(result["ratio"]) == {"default", "full", "policy=recover"} and result["ratio_steady"]["default"] > 0
    # each variant warmed a whole period of its probes' cadences: no compile is timed as a step (session 9: 36x)
    assert result["graphs_compiled_timed"] == dict.fromkeys(["bare", "default", "full", "policy=recover", CONTROL], 0)


def test_the_precision_loss_is_the_plain_cross_entropy_under_bf16_autocast():
    import torch
    import torch.nn.functional as F

    from keel.harness.bench.overhead import precision_loss
    from keel.proxy import create_proxy_model

    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    assert precision_loss(model, OverheadConfig()) is None  # the plain loop's own loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    assert torch.equal(precision_loss(model, OverheadConfig(autocast="bf16"))(x, y), expected)
    # through torch.compile (inductor: seconds to compile) in the slow test above


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"autocast": "fp8"}, r"OverheadConfig.autocast='fp8'; allowed: None, bf16"),
        ({"compile": True, "source_drift_every": 5}, "source_drift_every with compile or autocast"),
    ],
)
def test_bad_precision_settings_are_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        OverheadConfig(**fields)


def test_compile_with_ddp_is_one_clear_error():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=r"--compile has no effect with --ddp \(.*eager float32"):
        overhead_main(parser.parse_args(["--ddp", "2", "--compile"]))  # named alone: only it was given
