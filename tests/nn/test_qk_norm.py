"""QKNorm against float64 LayerNorm/RMSNorm formulas, with dtype and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keel.nn import QKNorm


def _layer64(x: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _rms64(x: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize(("kind", "ref"), [("layer", _layer64), ("rms", _rms64)])
def test_matches_float64_with_gain_and_bias(kind: str, ref) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen) * 7 + 2
    norm = QKNorm(8, kind=kind, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        if norm.bias is not None:
            norm.bias.copy_(torch.linspace(-1, 1, 8))
    expected = ref(x.numpy(), 1e-5) * np.linspace(0.5, 2.0, 8)
    if kind == "layer":
        expected = expected + np.linspace(-1, 1, 8)
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (norm.bias is None) == (kind == "rms")


def test_bf16_is_normalised_in_float32_and_returned_in_bf16() -> None:
    x = (torch.randn(4, 16) * 100).bfloat16()
    y = QKNorm(16, kind="rms")(x)
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(y.detach().float().numpy(), _rms64(x.float().numpy(), 1e-5), rtol=1e-2, atol=1e-2)


def test_edge_values() -> None:
    zeros = torch.zeros(2, 4)
    assert torch.equal(QKNorm(4, kind="rms")(zeros), zeros)
    assert torch.equal(QKNorm(4)(zeros), zeros)
    y = QKNorm(4)(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))
    assert torch.isnan(y).all()
    assert QKNorm(4, affine=False)(torch.randn(3, 4)).shape == (3, 4)
    assert list(QKNorm(4, affine=False).parameters()) == []


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="QKNorm.kind="):
        QKNorm(8, kind="batch")
    with pytest.raises(ValueError, match="QKNorm.head_dim="):
        QKNorm(0)
    with pytest.raises(ValueError, match="QKNorm.eps="):
        QKNorm(8, eps=0.0)
    with pytest.raises(ValueError, match="head_dim=8"):
        QKNorm(8)(torch.zeros(2, 4))
