"""ConfidenceDropFilter: a worked example by hand, ties, NaN/Inf rows, the open-set drop, dtypes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.data import ConfidenceDropFilter, confidence_drop_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: more threads only add contention


def test_worked_example_by_hand():
    original = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])
    adapted = torch.tensor([[math.log(4.0), 0.0], [math.log(2.0), 0.0], [0.0, math.log(2.0)]])
    # sample 0: original predicts class 0 at 3/4; adapted gives class 0 4/5 → rose by 0.05, kept
    # sample 1: original ties 1/2–1/2, predicts class 0 (argmax takes the first); adapted 2/3 → kept
    # sample 2: original predicts class 1 at 4/5; adapted 2/3 → dropped by 0.133
    assert ConfidenceDropFilter()(adapted, original).tolist() == [True, True, False]
    assert ConfidenceDropFilter(margin=0.1)(adapted, original).tolist() == [False, True, False]  # 0.05 < 0.1 ≤ 0.167
    assert ConfidenceDropFilter(margin=-0.2)(adapted, original).tolist() == [True, True, True]
    # the open-set drop: the original model's confidence 3/4, 1/2, 4/5
    assert ConfidenceDropFilter(min_confidence=0.6)(adapted, original).tolist() == [True, False, False]


def test_a_sample_whose_confidence_did_not_change_is_kept():
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    assert ConfidenceDropFilter()(logits, logits.clone()).all()


def test_rows_with_a_non_finite_logit_are_dropped_and_the_others_judged_as_usual():
    original = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    adapted = torch.tensor([[2.0, 0.0], [math.nan, 0.0], [2.0, math.inf], [2.0, 0.0]])
    original[3, 1] = math.inf  # (-inf is a masked class, judged: the test below)
    assert ConfidenceDropFilter()(adapted, original).tolist() == [True, False, False, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_logits_give_the_float32_answer(dtype):
    generator = torch.Generator().manual_seed(1)
    original, adapted = torch.randn(64, 7, generator=generator), torch.randn(64, 7, generator=generator)
    cast = confidence_drop_mask(adapted.to(dtype), original.to(dtype))
    reference = confidence_drop_mask(adapted.to(dtype).float(), original.to(dtype).float())
    assert torch.equal(cast, reference)


def test_the_mask_carries_no_gradient_and_leaves_the_logits_alone():
    adapted = torch.randn(4, 3, requires_grad=True)
    original = torch.randn(4, 3)
    before = adapted.detach().clone()
    mask = ConfidenceDropFilter()(adapted, original)
    assert mask.dtype == torch.bool and not mask.requires_grad
    assert torch.equal(adapted.detach(), before)


@pytest.mark.parametrize(
    ("adapted", "original"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 2)),
        (torch.zeros(4), torch.zeros(4)),
        (torch.zeros(4, 0), torch.zeros(4, 0)),
        ([[0.0, 1.0]], torch.zeros(1, 2)),
    ],
)
def test_logits_of_the_wrong_shape_get_one_error_naming_them(adapted, original):
    with pytest.raises(ValueError, match="allowed: two \\(batch, classes\\) tensors of the same shape"):
        ConfidenceDropFilter()(adapted, original)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"margin": 1.0}, "margin=1.0"),
        ({"margin": math.nan}, "margin=nan"),
        ({"margin": "0"}, "margin='0'"),
        ({"min_confidence": 0.0}, "min_confidence=0.0"),
        ({"min_confidence": 1.5}, "min_confidence=1.5"),
        ({"min_confidence": True}, "min_confidence=True"),
    ],
)
def test_bad_settings_get_one_error_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ConfidenceDropFilter(**fields)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 5), st.floats(-0.5, 0.5), st.integers(0, 2**16))
def test_a_larger_margin_never_keeps_more(batch, classes, margin, seed):
    generator = torch.Generator().manual_seed(seed)
    original, adapted = (
        torch.randn(batch, classes, generator=generator),
        torch.randn(batch, classes, generator=generator),
    )
    loose = confidence_drop_mask(adapted, original, margin=margin)
    strict = confidence_drop_mask(adapted, original, margin=margin + 0.1)
    assert not (strict & ~loose).any()


def test_a_class_masked_with_minus_inf_is_a_probability_of_zero_not_a_bad_row():
    # a head restricted to a label subset masks the other classes with -inf: every sample was dropped (reviewer V20)
    torch.manual_seed(0)
    original = torch.randn(6, 5)
    adapted = original + 0.5 * torch.randn(6, 5)
    mask = torch.tensor([0.0, 0.0, 0.0, 0.0, float("-inf")])
    assert torch.equal(
        ConfidenceDropFilter()(adapted + mask, original + mask),
        ConfidenceDropFilter()(adapted - 1e9 * (mask != 0), original - 1e9 * (mask != 0)),
    )
    nan_row, all_masked = original.clone(), original.clone()
    nan_row[0, 1] = float("nan")
    all_masked[1] = float("-inf")
    kept = ConfidenceDropFilter()(adapted, nan_row)
    assert not kept[0] and not ConfidenceDropFilter()(adapted, all_masked)[1]
    plus_inf = original.clone()
    plus_inf[2, 0] = float("inf")
    assert not ConfidenceDropFilter()(adapted, plus_inf)[2]
