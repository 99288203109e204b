"""StableMax and its cross-entropy against float64 re-derivations, the paper's example, softmax collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from keel.losses import log_stablemax, stablemax, stablemax_cross_entropy, stablemax_s


def _s64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    out = np.empty_like(x)
    out[x >= 0] = x[x >= 0] + 1.0
    out[x < 0] = 1.0 / (1.0 - x[x < 0])
    return out


def _ce64(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    s = _s64(logits)
    return -np.log(s[np.arange(len(target)), target] / s.sum(-1))


def test_paper_example_probabilities() -> None:
    # arXiv 2501.04697: logits (100, 0, -100) give about (0.990, 0.0098, 0.0001).
    probs = stablemax(torch.tensor([100.0, 0.0, -100.0]))
    expected = _s64(np.array([100.0, 0.0, -100.0]))
    np.testing.assert_allclose(probs.numpy(), expected / expected.sum(), rtol=1e-6)
    np.testing.assert_allclose(probs.numpy(), [0.990, 0.0098, 0.0001], atol=1e-4)


def test_s_is_continuous_with_unit_slope_at_zero_and_finite_gradients() -> None:
    x = torch.tensor([-3.0, -1e-7, 0.0, 1e-7, 1.0, 4.0], requires_grad=True)
    stablemax_s(x).sum().backward()
    x64 = x.detach().numpy().astype(np.float64)
    slope64 = np.where(x64 >= 0, 1.0, 1.0 / (1.0 - np.minimum(x64, 0.0)) ** 2)
    np.testing.assert_allclose(x.grad.numpy(), slope64, rtol=1e-6)
    assert stablemax_s(torch.tensor(0.0)).item() == 1.0


def test_cross_entropy_and_gradient_match_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen) * 30
    target = torch.randint(0, 10, (64,), generator=gen)
    per_sample = stablemax_cross_entropy(logits, target, reduction="none")
    np.testing.assert_allclose(per_sample.numpy(), _ce64(logits.numpy(), target.numpy()), rtol=2e-6, atol=1e-7)
    # Gradient against autograd through a naive float64 formula (an independent code path).
    x32 = logits.clone().requires_grad_()
    stablemax_cross_entropy(x32, target).backward()
    x64 = logits.double().requires_grad_()
    s = torch.where(x64 >= 0, x64 + 1, 1 / (1 - x64))
    (-(s.gather(1, target[:, None]).squeeze(1) / s.sum(1)).log().mean()).backward()
    np.testing.assert_allclose(x32.grad.numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(log_stablemax(logits).exp().sum(-1).numpy(), np.ones(64), rtol=1e-5)


def test_tiny_losses_keep_relative_precision_in_float32() -> None:
    # The target leads by 1e4: loss = log1p(2 / 10001) ≈ 2e-4. log(Σs) − log(s_y) in float32 is off by ~0.5%.
    logits = torch.tensor([[1e4, 0.0, 0.0], [3e5, -2.0, 7.0]])
    target = torch.tensor([0, 0])
    got = stablemax_cross_entropy(logits, target, reduction="none")
    np.testing.assert_allclose(got.numpy(), _ce64(logits.numpy(), target.numpy()), rtol=1e-6)
    # log StableMax keeps the same precision for the dominant class.
    np.testing.assert_allclose(-log_stablemax(logits)[:, 0].numpy(), _ce64(logits.numpy(), target.numpy()), rtol=1e-6)


def test_no_softmax_collapse_where_float32_softmax_collapses() -> None:
    logits = torch.tensor([[120.0, 0.0, 0.0]], requires_grad=True)  # exp(-120) underflows float32
    target = torch.tensor([0])
    softmax_loss = F.cross_entropy(logits, target)
    softmax_loss.backward()
    assert softmax_loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0  # collapsed: no signal left
    logits.grad = None
    stable_loss = stablemax_cross_entropy(logits, target)
    stable_loss.backward()
    assert stable_loss.item() == pytest.approx(float(_ce64(logits.detach().numpy(), target.numpy())[0]), rel=1e-6)
    assert stable_loss.item() > 0 and torch.count_nonzero(logits.grad) == 3


def test_reductions_dtypes_and_edge_values() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=gen)
    target = torch.randint(0, 4, (5,), generator=gen)
    each = stablemax_cross_entropy(logits, target, reduction="none")
    assert stablemax_cross_entropy(logits, target, reduction="sum").item() == pytest.approx(each.sum().item())
    assert stablemax_cross_entropy(logits, target).item() == pytest.approx(each.mean().item())
    bf16 = stablemax_cross_entropy(logits.bfloat16(), target, reduction="none")
    assert bf16.dtype == torch.float32
    np.testing.assert_allclose(bf16.numpy(), _ce64(logits.bfloat16().float().numpy(), target.numpy()), rtol=1e-5)
    # (B, T, C) logits with (B, T) targets.
    assert stablemax_cross_entropy(logits.view(1, 5, 4), target.view(1, 5)).item() == pytest.approx(each.mean().item())
    edge = torch.tensor([[0.0, float("-inf")], [float("nan"), 0.0], [0.0, 0.0]])
    out = stablemax_cross_entropy(edge, torch.tensor([0, 1, 0]), reduction="none")
    assert out[0].item() == 0.0  # s(-inf) = 0: the other class has no mass
    assert torch.isnan(out[1])
    assert out[2].item() == pytest.approx(np.log(2))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="target.shape"):
        stablemax_cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_a_single_plus_inf_logit_takes_probability_one_in_both_forms() -> None:
    # stablemax gave inf/inf = NaN where log_stablemax gave the limit (log p = 0 there, −inf elsewhere).
    x = torch.tensor([[float("inf"), 0.0, 1.0], [2.0, float("inf"), -3.0], [float("inf"), float("inf"), 0.0]])
    probs = stablemax(x)
    assert probs[:2].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    torch.testing.assert_close(probs[:2], log_stablemax(x)[:2].exp())
    # two +inf: no limit; both forms say NaN there and 0 probability elsewhere
    assert torch.isnan(probs[2, :2]).all() and torch.isnan(log_stablemax(x)[2, :2]).all()
    assert probs[2, 2].item() == 0.0 and log_stablemax(x)[2, 2].item() == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_of_a_target_logit_at_the_float32_limit_is_finite(dtype: torch.dtype) -> None:
    # s(−3e38) = 3.3e-39 is subnormal and Σ_other/s_target overflowed: the loss was inf, float64 says 88.4.
    logits = torch.tensor([[-3e38, 0.0, 2.0], [-1e38, 5.0, -1.0], [0.5, -2.0, 1.0]], dtype=dtype)
    target = torch.tensor([0, 0, 2])
    x = logits.clone().requires_grad_()
    loss = stablemax_cross_entropy(x, target, reduction="none")
    expected = _ce64(logits.double().numpy(), target.numpy())
    np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=1e-6)
    loss.sum().backward()
    x64 = logits.double().requires_grad_()
    s = torch.where(x64 >= 0, x64.clamp(min=0) + 1, 1 / (1 - x64.clamp(max=0)))
    (-torch.log(s.gather(1, target[:, None]).squeeze(1) / s.sum(1))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    rtol = 1e-5 if dtype == torch.float32 else 8e-3  # the gradient is rounded to bf16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=1e-12)


def test_targets_of_minus_100_are_ignored_as_by_f_cross_entropy_even_over_nan_logits() -> None:
    """Hugging Face labels padding and prompt tokens -100 (F.cross_entropy's ignore_index): before, the gather
    raised "index -100 is out of bounds" (on CUDA, a device-side assert)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen)
    target = torch.tensor([1, -100, 4, 0, -100, 2])
    kept = target != -100
    logits[1] = float("nan")  # a fully masked attention row's logits
    logits.requires_grad_()
    loss = stablemax_cross_entropy(logits, target)
    expected = stablemax_cross_entropy(logits.detach()[kept], target[kept])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # the sum runs over zeros too
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad[~kept].any()
    per_token = stablemax_cross_entropy(logits.detach(), target, reduction="none")
    assert per_token.shape == (6,) and not per_token[~kept].any()
    torch.testing.assert_close(per_token.sum(), stablemax_cross_entropy(logits.detach(), target, reduction="sum"))
    everything = torch.full((6,), 7)
    assert stablemax_cross_entropy(logits.detach(), everything, ignore_index=7).item() == 0.0


@pytest.mark.parametrize("target", [torch.full((3,), 1.7), torch.ones(3, dtype=torch.bool)])
def test_a_target_that_is_not_integer_is_refused(target) -> None:
    """A float target was truncated to a class index by .long() (1.7 -> class 1), silently."""
    with pytest.raises(ValueError, match=r"target.dtype=torch\.\w+; allowed: an integer dtype"):
        stablemax_cross_entropy(torch.randn(3, 4), target)


@settings(max_examples=40, deadline=None)
@given(
    logits=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(2, 5)), elements=st.floats(-50, 50, width=32)),
    data=st.data(),
)
def test_ignoring_a_token_is_leaving_it_out(logits, data) -> None:
    """The loss over a batch with ignored targets is the loss over the kept tokens alone, and the ignored tokens'
    logits get an exactly-zero gradient."""
    n, c = logits.shape
    target = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    ignored = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    x = torch.from_numpy(logits).requires_grad_()
    loss = stablemax_cross_entropy(x, torch.where(ignored, -100, target))
    kept = ~ignored
    expected = stablemax_cross_entropy(x.detach()[kept], target[kept]) if kept.any() else torch.tensor(0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert not x.grad[ignored].any()
