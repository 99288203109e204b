"""filter_preference_pairs: counts, order and records on given scores; the model path equals ches_scores."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.data import DEFAULT_DROP_FRACTION, DroppedPair, ches_scores, filter_preference_pairs
from tests.data.tiny_lm import tiny_qwen2, tiny_tokenizer


def test_drops_the_highest_scores_and_keeps_input_order() -> None:
    pairs = ["a", "b", "c", "d", "e"]
    result = filter_preference_pairs(pairs, scores=[0.1, 5.0, -2.0, 3.0, 0.2], drop_fraction=0.4)
    assert result.kept == ["a", "c", "e"] and result.kept_indices == [0, 2, 4]
    assert result.dropped == [DroppedPair(index=1, score=5.0, pair="b"), DroppedPair(index=3, score=3.0, pair="d")]
    assert result.scores == [0.1, 5.0, -2.0, 3.0, 0.2] and result.threshold == 3.0


def test_default_drops_ten_percent_rounded_down() -> None:
    assert DEFAULT_DROP_FRACTION == 0.1
    scores = [float(i) for i in range(20)]
    assert [d.index for d in filter_preference_pairs(list(range(20)), scores=scores).dropped] == [19, 18]
    few = filter_preference_pairs(list(range(5)), scores=[1.0] * 5)  # 0.5 pairs: none dropped
    assert few.dropped == [] and few.threshold is None and len(few.kept) == 5


def test_the_papers_recipe_keeps_the_lowest_five_percent() -> None:
    # README: the 19 lowest-CHES samples of 380 (SORRY-Bench); 0.05·380 is exactly 19
    scores = torch.linspace(1.0, -1.0, 380)
    result = filter_preference_pairs(list(range(380)), scores=scores, keep_fraction=0.05)
    assert result.kept_indices == list(range(361, 380))
    assert len(result.dropped) == 361


@pytest.mark.parametrize(
    ("n", "kwargs", "dropped"),
    [
        (100, {"drop_fraction": 0.29}, 29),  # 0.29·100 = 28.999999999999996 in floating point
        (10, {"drop_fraction": 0.0}, 0),
        (10, {"drop_fraction": 1.0}, 10),
        (10, {"keep_fraction": 0.0}, 10),
        (10, {"keep_fraction": 1.0}, 0),
        (10, {"keep_fraction": 0.25}, 7),  # keep ceil(2.5) = 3
        (7, {"drop_fraction": 0.5}, 3),
    ],
)
def test_how_many_are_dropped(n: int, kwargs: dict, dropped: int) -> None:
    result = filter_preference_pairs(list(range(n)), scores=[float(i) for i in range(n)], **kwargs)
    assert len(result.dropped) == dropped and len(result.kept) == n - dropped


def test_ties_drop_the_earlier_pair_first() -> None:
    result = filter_preference_pairs(["x", "y", "z"], scores=[2.0, 2.0, 1.0], drop_fraction=0.34)
    assert [d.index for d in result.dropped] == [0]


TRIPLES = [
    {"prompt": "what is two plus two?", "chosen": " four.", "rejected": " five."},
    {"prompt": "say hi", "chosen": " hi there!", "rejected": " hi there."},
    {"prompt": "a", "chosen": " b", "rejected": " a long and different answer, 42"},
    {"prompt": "count: 1 2 3", "chosen": " 4 5 6", "rejected": " 4 5"},
]


def test_model_path_scores_with_length_normalised_ches_over_separately_tokenized_pairs_with_eos() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2(len(tokenizer), seed=1)
    result = filter_preference_pairs(TRIPLES, model=model, tokenizer=tokenizer, drop_fraction=0.5)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    expected = ches_scores(
        model,
        [encode(t["prompt"]) for t in TRIPLES],
        [encode(t["chosen"]) + eos for t in TRIPLES],
        [encode(t["rejected"]) + eos for t in TRIPLES],
        length_normalize=True,
    )
    assert result.scores == pytest.approx(expected.tolist(), rel=1e-6)
    top_two = sorted(range(4), key=lambda i: -expected[i].item())[:2]
    assert [d.index for d in result.dropped] == top_two
    assert result.kept == [TRIPLES[i] for i in sorted(set(range(4)) - set(top_two))]
    no_eos = filter_preference_pairs(TRIPLES, model=model, tokenizer=tokenizer, add_eos=False)
    assert no_eos.scores != pytest.approx(result.scores, rel=1e-6)


@pytest.mark.parametrize(
    ("pairs", "kwargs", "match"),
    [
        ([], {"scores": []}, r"pairs=\[\]; allowed: a non-empty sequence"),
        ("abc", {"scores": [1.0, 2.0, 3.0]}, r"pairs='abc'"),
        (["a"], {}, r"scores and model: give exactly one"),
        (["a"], {"scores": [1.0], "model": object()}, r"scores and model: give exactly one"),
        (["a"], {"model": object()}, r"tokenizer=None with a model"),
        (["a", "b"], {"scores": [1.0]}, r"len\(scores\)=1; allowed: one score per pair \(2\)"),
        (["a", "b"], {"scores": torch.zeros(2, 1)}, r"scores.shape=\(2, 1\)"),
        (["a", "b"], {"scores": [1.0, math.nan]}, r"scores\[1\]=nan; allowed: finite numbers"),
        (["a", "b"], {"scores": torch.tensor([math.inf, 1.0])}, r"scores\[0\]=inf"),
        (["a", "b"], {"scores": ["1", "2"]}, r"scores=\['1', '2'\]; allowed: numbers"),
        (["a"], {"scores": [1.0], "drop_fraction": 0.1, "keep_fraction": 0.9}, r"at most one of them"),
        (["a"], {"scores": [1.0], "drop_fraction": 1.5}, r"drop_fraction=1.5; allowed: a number in \[0, 1\]"),
        (["a"], {"scores": [1.0], "keep_fraction": -0.1}, r"keep_fraction=-0.1"),
        (["a"], {"scores": [1.0], "keep_fraction": True}, r"keep_fraction=True"),
    ],
)
def test_hostile_inputs(pairs, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        filter_preference_pairs(pairs, **kwargs)


def test_model_path_refuses_pairs_without_the_three_strings() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2(len(tokenizer))
    with pytest.raises(ValueError, match=r"pairs\[1\]=.*allowed: a mapping with string 'prompt', 'chosen'"):
        filter_preference_pairs([TRIPLES[0], {"prompt": "x", "chosen": "y"}], model=model, tokenizer=tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"add_eos=True but the tokenizer has no eos_token_id"):
        filter_preference_pairs(TRIPLES, model=model, tokenizer=tokenizer)


@settings(max_examples=100, deadline=None)
@given(
    scores=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40),
    fraction=st.floats(0.0, 1.0),
)
def test_kept_and_dropped_partition_the_pairs_and_every_dropped_score_is_at_least_every_kept_one(
    scores: list[float], fraction: float
) -> None:
    result = filter_preference_pairs(list(range(len(scores))), scores=scores, drop_fraction=fraction)
    assert len(result.dropped) == math.floor(len(scores) * fraction + 1e-9)
    assert sorted(result.kept_indices + [d.index for d in result.dropped]) == list(range(len(scores)))
    if result.dropped and result.kept:
        assert min(d.score for d in result.dropped) >= max(scores[i] for i in result.kept_indices)
