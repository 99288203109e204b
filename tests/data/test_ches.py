"""ches_score against numbers worked out by hand, and ches_scores on a tiny Qwen2 against a manual gather."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.data import ches_score, ches_scores
from tests.data.tiny_lm import tiny_qwen2, tiny_tokenizer

NAN = float("nan")
# pair 0: h⁺ = (1, 0), (0, 2) [+ a padding row]; h⁻ = (1, 1), (2, 0), (0, 1)
#   Σh⁺ = (1, 2), Σh⁻ = (3, 2): CHES = (3 + 4) − (1 + 4) = 2; normalised = 7 / (2·3) − 5 / 2² = −1/12
# pair 1: h⁺ = (1, −1), (2, 1), (0, 3); h⁻ = (−1, 0) [+ two NaN padding rows]
#   Σh⁺ = (3, 3), Σh⁻ = (−1, 0): CHES = −3 − 18 = −21; normalised = −3 / (3·1) − 18 / 3² = −3
H_CHOSEN = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]], [[1.0, -1.0], [2.0, 1.0], [0.0, 3.0]]])
H_REJECTED = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [NAN, NAN], [NAN, NAN]]])
MASK_CHOSEN = torch.tensor([[True, True, False], [True, True, True]])
MASK_REJECTED = torch.tensor([[1, 1, 1], [1, 0, 0]])  # 0/1 numbers work like bools


def test_ches_score_matches_the_hand_computation() -> None:
    masks = {"mask_chosen": MASK_CHOSEN, "mask_rejected": MASK_REJECTED}
    assert ches_score(H_CHOSEN, H_REJECTED, **masks).tolist() == [2.0, -21.0]
    normalised = ches_score(H_CHOSEN, H_REJECTED, **masks, length_normalize=True)
    assert normalised.tolist() == pytest.approx([-1 / 12, -3.0], rel=1e-6)


def test_ches_score_without_masks_uses_every_position_and_bf16_computes_in_float32() -> None:
    h_pos, h_neg = H_CHOSEN[:1, :2], H_REJECTED[:1]
    assert ches_score(h_pos, h_neg).tolist() == [2.0]
    g = torch.Generator().manual_seed(0)
    h_pos, h_neg = torch.randn(3, 5, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    low = ches_score(h_pos.bfloat16(), h_neg.bfloat16(), length_normalize=True)
    assert low.dtype == torch.float32
    exact = ches_score(h_pos.bfloat16().double(), h_neg.bfloat16().double(), length_normalize=True)
    assert exact.dtype == torch.float64
    assert low.tolist() == pytest.approx(exact.tolist(), rel=1e-5, abs=1e-5)


def test_nan_hidden_states_propagate_to_their_pair_only() -> None:
    h_pos = H_CHOSEN.clone()
    h_pos[1, 0, 0] = NAN
    got = ches_score(h_pos, H_REJECTED, mask_chosen=MASK_CHOSEN, mask_rejected=MASK_REJECTED)
    assert got[0].item() == 2.0 and math.isnan(got[1].item())


@pytest.mark.parametrize(
    ("h_pos", "h_neg", "kwargs", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, 4), {}, r"h_chosen: shape \(2, 3\), torch.float32; allowed: a floating"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), {}, r"h_chosen: shape \(2, 3, 4\), torch.int64"),
        (torch.zeros(2, 3, 4), [[0.0]], {}, r"h_rejected: list"),
        (
            torch.zeros(2, 3, 4),
            torch.zeros(3, 3, 4),
            {},
            r"h_rejected.shape=\(3, 3, 4\); allowed: the pairs and hidden",
        ),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), {}, r"h_rejected.shape=\(2, 3, 5\)"),
        (torch.zeros(0, 3, 4), torch.zeros(0, 3, 4), {}, r"h_chosen has 0 pairs"),
        (torch.zeros(2, 0, 4), torch.zeros(2, 3, 4), {}, r"h_chosen has 0 positions"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), {"mask_chosen": torch.ones(2, 4)}, r"mask_chosen: \(2, 4\)"),
        (
            torch.zeros(2, 3, 4),
            torch.zeros(2, 3, 4),
            {"mask_rejected": torch.tensor([[1, 0, 0], [0, 0, 0]])},
            r"mask_rejected selects no position for pair 1",
        ),
    ],
)
def test_ches_score_hostile_inputs(h_pos, h_neg, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ches_score(h_pos, h_neg, **kwargs)


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.integers(1, 3),
    length=st.integers(1, 5),
    hidden=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 10.0),
)
def test_ches_score_properties(pairs: int, length: int, hidden: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    h_pos = torch.randn(pairs, length, hidden, generator=g, dtype=torch.float64)
    h_neg = torch.randn(pairs, length, hidden, generator=g, dtype=torch.float64)
    plain = ches_score(h_pos, h_neg)
    # identical responses: ⟨Σh, Σh⟩ − ‖Σh‖² = 0
    assert ches_score(h_pos, h_pos.clone()).abs().max().item() <= 1e-9 * (1 + plain.abs().max().item())
    # equal lengths n: the normalised form is the sum form / n²
    normalised = ches_score(h_pos, h_neg, length_normalize=True)
    assert normalised.tolist() == pytest.approx((plain / length**2).tolist(), rel=1e-9, abs=1e-12)
    # quadratic in the hidden states
    scaled = ches_score(scale * h_pos, scale * h_neg)
    assert scaled.tolist() == pytest.approx((scale**2 * plain).tolist(), rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_qwen2(len(tokenizer))


TRIPLES = [
    ("what is two plus two?", " four.", " five."),
    ("say hi", " hi there!", " hi there."),
    ("a", " b", " a long and different answer, 42"),
    ("count: 1 2 3", " 4 5 6", " 4 5"),
]


def _ids(tokenizer, triples, eos: bool = True):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    tail = [tokenizer.eos_token_id] if eos else []
    return (
        [encode(p) for p, _, _ in triples],
        [encode(c) + tail for _, c, _ in triples],
        [encode(r) + tail for _, _, r in triples],
    )


def _manual_ches(model, prompt: list[int], chosen: list[int], rejected: list[int], normalise: bool) -> float:
    """One pair, unpadded forward passes, the positions sliced by hand, the formula in float64 loops."""
    sums, counts = [], []
    for response in (chosen, rejected):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True)
        states = out.hidden_states[-1][0].double().tolist()
        picked = states[len(prompt) - 1 : len(prompt) + len(response) - 1]  # last prompt token … second-to-last
        assert len(picked) == len(response)
        sums.append([sum(column) for column in zip(*picked, strict=True)])
        counts.append(len(picked))
    cross = sum(a * b for a, b in zip(sums[0], sums[1], strict=True))
    own = sum(a * a for a in sums[0])
    if normalise:
        return cross / (counts[0] * counts[1]) - own / counts[0] ** 2
    return cross - own


@pytest.mark.parametrize("normalise", [False, True])
def test_ches_scores_on_a_tiny_qwen2_match_a_manual_hidden_state_gather(lm, normalise: bool) -> None:
    tokenizer, model = lm
    prompts, chosen, rejected = _ids(tokenizer, TRIPLES)
    got = ches_scores(model, prompts, chosen, rejected, length_normalize=normalise, batch_size=3)
    expected = [_manual_ches(model, p, c, r, normalise) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert len(set(expected)) == len(expected)  # the pairs differ: the check is not vacuous


def test_ches_scores_batching_tensor_ids_and_training_flag(lm) -> None:
    tokenizer, model = lm
    prompts, chosen, rejected = _ids(tokenizer, TRIPLES)
    model.train()
    one_by_one = ches_scores(model, prompts, chosen, rejected, batch_size=1)
    assert model.training  # restored
    model.eval()
    as_tensors = ches_scores(model, [torch.tensor(p) for p in prompts], chosen, rejected, batch_size=16)
    assert not model.training
    assert as_tensors.tolist() == pytest.approx(one_by_one.tolist(), rel=1e-4, abs=1e-4)


def test_ches_scores_takes_a_2d_id_tensor_per_column_like_lists(lm) -> None:
    tokenizer, model = lm
    triples = [("ab", " c.", " d."), ("cd", " e!", " f?")]  # equal lengths: each column stacks into a 2-d tensor
    prompts, chosen, rejected = _ids(tokenizer, triples)
    as_lists = ches_scores(model, prompts, chosen, rejected)
    stacked = ches_scores(model, torch.tensor(prompts), torch.tensor(chosen), torch.tensor(rejected))
    assert stacked.tolist() == pytest.approx(as_lists.tolist(), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match=r"len\(prompts\)=0"):
        ches_scores(model, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0, 2))


class _NoHiddenStates(torch.nn.Module):
    def forward(self, input_ids, attention_mask, output_hidden_states):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([[1]], [[2]], [[3], [4]]), {}, r"len\(prompts\)=1, len\(chosen\)=1, len\(rejected\)=2; allowed: the same"),
        (([], [], []), {}, r"len\(prompts\)=0"),
        (([[]], [[2]], [[3]]), {}, r"prompts\[0\] is empty; allowed: at least one token"),
        (([[1]], [[2]], [[]]), {}, r"rejected\[0\] is empty"),
        (([[1]], [[2.0]], [[3]]), {}, r"chosen\[0\]=\[2.0\]; allowed: a sequence of int token ids"),
        (([[1]], [torch.tensor([2.0])], [[3]]), {}, r"chosen\[0\]=tensor\(\[2.\]\)"),
        (([[1]], [[2]], [[3]]), {"batch_size": 0}, r"batch_size=0; allowed: an int >= 1"),
    ],
)
def test_ches_scores_hostile_inputs(lm, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ches_scores(lm[1], *args, **kwargs)


def test_ches_scores_refuses_a_model_without_hidden_states() -> None:
    with pytest.raises(ValueError, match=r"has no hidden_states; allowed: a causal LM"):
        ches_scores(_NoHiddenStates(), [[1]], [[2]], [[3]])
