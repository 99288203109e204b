"""keel.stabilize's new norms and linears follow the model's bias convention (nanoGPT's ``bias=False`` ...)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.nn import QKNorm, QKNormMultiheadAttention, create_stabilizer, stabilize
from keel.proxy import create_proxy_model
from tests.nn._models import NanoGPT
from tests.nn.test_scale_long import TinyUViT


def _qk_biases(model: nn.Module) -> list[bool]:
    return [m.bias is not None for m in model.modules() if isinstance(m, QKNorm)]


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_qk_norms_have_a_bias_only_where_the_model_has_them(bias: bool) -> None:
    model = NanoGPT(bias=bias)
    stabilize(model, ["qk_norm"])
    assert _qk_biases(model) == [bias] * 4
    assert any("q_norm.bias" in k for k in model.state_dict()) is bias


def test_the_models_layer_norms_decide_over_bias_free_projections() -> None:
    # keel's proxy: bias-free Linear layers but LayerNorms with a bias, and its own qk_norm=True builds
    # nn.LayerNorm(head_dim) with one; stabilize builds what the model would.
    model = create_proxy_model("tiny")
    assert model.blocks[0].attn.qkv.bias is None
    stabilize(model, ["qk_norm"])
    assert set(_qk_biases(model)) == {True}


@pytest.mark.parametrize("bias", [False, True])
def test_multihead_attention_stack_built_with_bias_false(bias: bool) -> None:
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, bias=bias)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    stabilize(model, ["qk_norm"])
    assert isinstance(model.layers[0].self_attn, QKNormMultiheadAttention)
    assert _qk_biases(model) == [bias] * 4


def test_without_layer_norms_the_attention_projections_decide() -> None:
    class Attention(nn.Module):  # Llama-like: separate projections, no LayerNorm anywhere
        def __init__(self, bias: bool) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(8, 8, bias=bias), nn.Linear(8, 8, bias=bias)
            self.num_heads = 2

    for bias in (False, True):
        model = nn.Sequential(Attention(bias))
        stabilize(model, ["qk_norm"])
        assert _qk_biases(model) == [bias, bias]


def test_an_explicit_bias_option_overrides_the_model() -> None:
    model = NanoGPT(bias=True)
    stabilize(model, [create_stabilizer("qk_norm", bias=False)])
    assert _qk_biases(model) == [False] * 4
    with pytest.raises(ValueError, match="QKNormStabilizer.bias='no'; allowed: True, False or None"):
        create_stabilizer("qk_norm", bias="no")


def test_qk_norm_module_and_attention_without_bias() -> None:
    norm = QKNorm(8, bias=False)
    assert norm.bias is None and [n for n, _ in norm.named_parameters()] == ["weight"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), nn.functional.layer_norm(x, (8,), torch.ones(8), None, 1e-5))
    attn = QKNormMultiheadAttention(16, 4, bias=False, batch_first=True)
    assert attn.q_norm.bias is None and attn.k_norm.bias is None
    assert QKNormMultiheadAttention(16, 4, bias=False, norm_bias=True).q_norm.bias is not None


@pytest.mark.parametrize("bias", [False, True])
def test_scale_long_calibration_linears_follow_the_decoders_linears(bias: bool) -> None:
    model = TinyUViT()
    if not bias:  # as if built with bias=False
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias = None
    stabilize(model, [create_stabilizer("scale_long", mode="calibrated", tokens=6, reduction=2)])
    calib = model.long_skip_calibration
    assert (calib.fc1.bias is not None, calib.fc2.bias is not None) == (bias, bias)
    assert calib(torch.randn(2, 6, 8)).shape == (2, 6, 8)
