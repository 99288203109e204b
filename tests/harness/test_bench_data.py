"""`keel bench data` and its poisoned-examples scenario (issue 17): the fast checks of its parts."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.harness.bench import cli
from keel.harness.scenarios.data import PoisonConfig
from keel.harness.scenarios.data._corpus import POISON_BYTE, IndexedWindows, batched
from keel.harness.scenarios.data.poisoned_examples import _precision_recall, example_losses
from keel.proxy import create_proxy_model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 1}, "epochs=1"),
        ({"poisoned_steps": (5,)}, r"steps \[5\]"),  # inside the detectors' warm-up
        ({"poisoned_steps": (250,)}, r"steps \[250\]"),  # beside the epoch-end snapshot
        ({"fault_step": 19}, r"steps \[19\]"),
        ({"per_batch": 9}, "per_batch=9"),  # the poisoned half would be the median
        ({"batch_size": 0}, "batch_size"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_poison_config_refuses_a_setting_that_cannot_measure_what_it_claims(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoisonConfig(**overrides)


def test_the_quick_config_is_valid_and_smaller() -> None:
    quick = PoisonConfig.quick()
    assert quick.steps_per_epoch < PoisonConfig().steps_per_epoch
    assert quick.steps_per_epoch * quick.batch_size == quick.examples


def test_windows_are_real_text_and_the_poison_is_a_byte_the_corpus_never_has() -> None:
    data = IndexedWindows(examples=64, seq_len=32, seed=0)
    assert not (data.x == POISON_BYTE).any() and not (data.y == POISON_BYTE).any()
    assert bool((data.x[:, 1:] == data.y[:, :-1]).all())  # next-byte targets
    data.poison([3, 7])
    assert bool((data.x[[3, 7]] == POISON_BYTE).all()) and bool((data.y[[3, 7]] == POISON_BYTE).all())
    assert int((data.x == POISON_BYTE).any(1).sum()) == 2  # the other windows are untouched


def test_each_epoch_has_its_own_order_the_same_for_every_run() -> None:
    data = IndexedWindows(examples=50, seq_len=16, seed=3)
    again = IndexedWindows(examples=50, seq_len=16, seed=3)
    assert sorted(data.order(0)) == list(range(50))
    assert data.order(1) == again.order(1) and data.order(0) != data.order(1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=60), st.integers(1, 9))
def test_batched_gives_full_batches_in_order_and_drops_the_short_last(ids: list[int], size: int) -> None:
    batches = list(batched(ids, size))
    assert all(len(b) == size for b in batches)
    assert [i for b in batches for i in b] == ids[: len(ids) // size * size]


def test_example_losses_average_to_the_loops_token_mean() -> None:
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    data = IndexedWindows(examples=4, seq_len=16, seed=0)
    x, y = data.batch([0, 1, 2, 3])
    token_mean = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert torch.allclose(example_losses(model, (x, y)).mean(), token_mean, atol=1e-6)


@pytest.mark.parametrize(
    ("found", "truth", "expected"),
    [
        ({1, 2}, {1, 2, 3, 4}, (2, 2, 1.0, 0.5)),
        ({1, 9}, {1}, (2, 1, 0.5, 1.0)),
        (set(), {1}, (0, 0, math.nan, 0.0)),
    ],
)
def test_precision_recall_over_the_poisoned_set(found: set, truth: set, expected: tuple) -> None:
    score = _precision_recall(found, truth)
    got = (score["named"], score["poisoned_named"], score["precision"], score["recall"])
    assert got[:2] == expected[:2] and got[3] == expected[3]
    assert got[2] == expected[2] or (math.isnan(got[2]) and math.isnan(expected[2]))


def test_keel_bench_data_is_registered_and_refuses_an_unknown_setting(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["data", "--quick", "--setting", "sensitive", "--json"])
    assert args.quick and args.setting == ["sensitive"] and args._bench_module == "keel.harness.bench.data"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["data", "--setting", "loose"])
    assert exit_info.value.code == 2 and "loose" in capsys.readouterr().err


@pytest.mark.slow
def test_keel_bench_data_quick_names_the_poisoned_examples_and_a_resumed_run_never_sees_them(
    capsys: pytest.CaptureFixture,
) -> None:
    import json

    from keel.harness.bench import data as bench

    args = argparse.Namespace(quick=True, setting=["default", "sensitive"], threads=1, json=True)
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for setting in ("default", "sensitive"):  # keel as shipped, and with the gradient detector's critical lowered
        scenario = result["scenarios"][setting]
        poisoned = len(scenario["poisoned_ids"])
        assert 6 <= poisoned <= 10
        for way in ("outliers", "skip_list"):
            scores = scenario["scores"][way]
            assert scores["recall"] == 1.0 and scores["precision"] == 1.0, (setting, way)
        assert scenario["fault"]["verdict"] == "transient" and scenario["fault"]["action"] == "skip"
        assert scenario["drawn"] == {"resumed": 0, "fresh": 0}
        assert abs(scenario["relative_to_clean"]["resumed"]) < 0.01 and scenario["relative_to_clean"]["fresh"] == 0.0
    # replay runs on critical spikes: the shipped detectors rate these poisoned batches info (attributed and skipped,
    # not replayed); with the critical ratio lowered they are critical and replay finds them reproducible
    assert result["scenarios"]["sensitive"]["poisoned_verdicts"] == ["data", "data"]
    assert set(result["overhead"]["warnings_or_criticals"].values()) == {0}  # "no finding", as measured
    assert result["costs"]["ms"]["replay"] > 0


def test_train_steps_tells_the_guard_each_batchs_ids_and_the_batch() -> None:
    from keel.harness.bench.loop import train_steps

    calls: list[tuple[list[int], tuple[int, ...]]] = []

    class Recorder:  # stands in for a Guard: what the loop passes to step()
        def step(self, loss: torch.Tensor, *, signals: object = None, batch_ids: object = None, batch: object = None):
            assert isinstance(batch, tuple)
            calls.append((list(batch_ids), tuple(batch[0].shape)))  # type: ignore[call-overload]

    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))) for _ in range(2)]
    train_steps(model, opt, data, Recorder(), 3, batch_ids=lambda i: range(2 * i, 2 * i + 2))  # type: ignore[arg-type]
    assert calls == [([0, 1], (2, 8)), ([2, 3], (2, 8)), ([4, 5], (2, 8))]


def test_bench_overhead_has_a_batch_ids_variant_with_an_attribution_only_when_asked() -> None:
    from keel.harness.bench.overhead import BATCH_IDS, OverheadConfig

    assert not any(BATCH_IDS in (kw or {}) for kw in OverheadConfig().variants().values())
    assert OverheadConfig(batch_ids=True).variants()["batch ids, attribution"] == {BATCH_IDS: True}
