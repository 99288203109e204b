"""log Z and the z-loss have one home, keel.losses.z_loss: every other module calls it.

Checked against a float64 NumPy re-derivation over random shapes, dtypes, scales and masks, against
NaN/±Inf/empty inputs, and by walking src/keel for a second ``logsumexp``.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import keel
from keel.losses import log_partition, z_loss, z_loss_from_log_z
from keel.nn import ZLossHook
from keel.signals import log_partition as measured_log_partition

SRC = Path(keel.__file__).parent
HOME = "losses/z_loss.py"
# Copies still waiting for their owner to call keel.losses.z_loss (issue 15, item 4); empty it once they do.
PENDING: tuple[str, ...] = ()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _reference_log_z(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return np.log(np.exp(x - peak).sum(axis=-1)) + peak[..., 0]


def _reference_z_loss(logits: np.ndarray, coefficient: float, mask: np.ndarray | None) -> float:
    squared = _reference_log_z(logits) ** 2
    if mask is None:
        return coefficient * float(squared.sum()) / max(squared.size, 1)
    return coefficient * float((squared * mask).sum()) / max(float(mask.sum()), 1.0)


@settings(max_examples=80, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    vocab=st.integers(1, 40),
    scale=st.sampled_from([0.0, 1.0, 8.0, 60.0]),
    dtype=st.sampled_from(DTYPES),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_z_loss_matches_a_float64_re_derivation(lead, vocab, scale, dtype, masked, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * scale + 3).to(dtype)
    mask = torch.rand(tuple(lead), generator=gen) > 0.5 if masked else None
    rounded = logits.double().numpy()  # the reference sees the same (rounded) logits
    expected_log_z = _reference_log_z(rounded)
    got_log_z = log_partition(logits)
    assert got_log_z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(got_log_z.double().numpy(), expected_log_z, rtol=rtol, atol=rtol)
    expected = _reference_z_loss(rounded, 0.5, None if mask is None else mask.numpy())
    assert z_loss(logits, coefficient=0.5, mask=mask).item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logits_give_the_limit_log_z(dtype: torch.dtype) -> None:
    inf, nan = math.inf, math.nan
    logits = torch.tensor([[0.0, -inf, 0.0], [-inf, -inf, -inf], [0.0, inf, 1.0], [nan, 0.0, 0.0]]).to(dtype)
    got = log_partition(logits).tolist()
    assert got[0] == pytest.approx(math.log(2), rel=1e-6)  # -inf entries are masked-out classes
    assert got[1] == -inf and got[2] == inf and math.isnan(got[3])
    assert math.isinf(z_loss(logits[:3]).item()) and math.isnan(z_loss(logits).item())
    # a mask keeps a non-finite row out of the loss: its weight is 0, never 0 · inf
    keep = torch.tensor([True, False, False, False])
    assert z_loss_from_log_z(log_partition(logits).nan_to_num(posinf=0.0, neginf=0.0), mask=keep).isfinite()


def test_empty_inputs_and_all_false_masks_give_zero_not_nan() -> None:
    assert z_loss(torch.zeros(0, 7)).item() == 0.0
    assert z_loss(torch.zeros(0, 3, 7), mask=torch.zeros(0, 3, dtype=torch.bool)).item() == 0.0
    assert z_loss(torch.randn(2, 3, 7), mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    assert log_partition(torch.zeros(0, 7)).shape == (0,)


def test_half_precision_logits_that_overflow_in_half_are_reduced_in_float32() -> None:
    logits = torch.full((2, 4), 60000.0, dtype=torch.float16)  # exp-sum of 4 · e^0 fine, log Z = 60000 + log 4
    assert log_partition(logits).tolist() == pytest.approx([60000 + math.log(4)] * 2, rel=1e-7)
    assert z_loss(logits, coefficient=1.0).isfinite()  # (60001.4)² overflows float16, not float32


def test_every_caller_gets_the_same_numbers() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 4, 50, generator=gen) * 6).requires_grad_()
    mask = torch.rand(3, 4, generator=gen) > 0.3
    want = log_partition(logits)
    measured = measured_log_partition(logits)
    assert not measured.requires_grad  # the measurement never carries the training graph
    torch.testing.assert_close(measured, want.detach(), rtol=0, atol=0)
    hook = ZLossHook(coefficient=0.25)
    hook(torch.nn.Identity(), (), logits)
    torch.testing.assert_close(hook.loss(mask), z_loss(logits, coefficient=0.25, mask=mask), rtol=0, atol=0)


def _logsumexp_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, (ast.Attribute, ast.Name))
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "logsumexp"
    ]


def test_log_z_is_computed_only_in_keel_losses_z_loss() -> None:
    elsewhere = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != HOME and rel not in PENDING:
            elsewhere += [f"{rel}:{line}" for line in _logsumexp_calls(path)]
    assert elsewhere == [], "call keel.losses.log_partition / z_loss instead of a second logsumexp"
    assert _logsumexp_calls(SRC / HOME), "the walker must see the home's own call"


def test_the_pending_list_names_only_files_that_still_hold_a_copy() -> None:
    stale = [rel for rel in PENDING if not (SRC / rel).exists() or not _logsumexp_calls(SRC / rel)]
    assert stale == [], f"{stale} no longer compute log Z themselves: drop them from PENDING"
