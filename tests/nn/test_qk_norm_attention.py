"""QKNormMultiheadAttention: identical to nn.MultiheadAttention when its norms are identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.nn import QKNormMultiheadAttention


def _pair(batch_first: bool, kdim: int | None = None, bias: bool = True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    ours = QKNormMultiheadAttention.from_module(mha).eval()
    ours.q_norm, ours.k_norm = nn.Identity(), nn.Identity()  # isolate the attention arithmetic
    return mha, ours


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_matches_multihead_attention_with_masks(batch_first: bool, need_weights: bool, average: bool) -> None:
    mha, ours = _pair(batch_first)
    gen = torch.Generator().manual_seed(1)
    shape = (2, 5, 12) if batch_first else (5, 2, 12)
    q, kv = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    attn_mask = torch.rand(5, 5, generator=gen) > 0.7
    attn_mask.fill_diagonal_(False)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5])
    kwargs = dict(
        key_padding_mask=padding, need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average
    )
    expected_out, expected_w = mha(q, kv, kv, **kwargs)
    out, w = ours(q, kv, kv, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(w, expected_w, rtol=1e-5, atol=1e-6)
    else:
        assert w is None


def test_float_mask_kdim_and_unbatched() -> None:
    mha, ours = _pair(True, kdim=7)
    gen = torch.Generator().manual_seed(2)
    q, kv = torch.randn(2, 4, 12, generator=gen), torch.randn(2, 6, 7, generator=gen)
    mask = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(ours(q, kv, kv, attn_mask=mask)[0], mha(q, kv, kv, attn_mask=mask)[0])
    mha, ours = _pair(False, bias=False)
    x = torch.randn(4, 12, generator=gen)
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-6)


def test_from_module_shares_parameters_and_normalises() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = QKNormMultiheadAttention.from_module(mha, norm="rms")
    assert ours.in_proj_weight is mha.in_proj_weight and ours.out_proj is mha.out_proj
    assert set(ours.state_dict()) == set(mha.state_dict()) | {"q_norm.weight", "k_norm.weight"}
    x = torch.randn(1, 3, 8) * 50
    out, weights = ours(x, x, x)
    assert torch.isfinite(out).all() and torch.allclose(weights.sum(-1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="add_bias_kv"):
        QKNormMultiheadAttention.from_module(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, is_causal=True)


def test_transformer_encoder_layer_cannot_bypass_the_norms_in_inference() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer.self_attn = QKNormMultiheadAttention.from_module(layer.self_attn)
    x = torch.randn(2, 5, 8)
    layer.train()
    expected = layer(x)
    layer.eval()
    with torch.no_grad():  # the condition for the fused inference kernel, which would skip q_norm/k_norm
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def _encoder_with_qk_norm() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), num_layers=2)
    for layer in encoder.layers:
        layer.self_attn = QKNormMultiheadAttention.from_module(layer.self_attn)
        with torch.no_grad():  # norms away from their identity start, so that skipping them would show
            layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
    return encoder.eval()


def test_a_transformer_encoder_in_eval_with_a_padding_mask_runs_its_nested_path_through_the_norms() -> None:
    # nn.TransformerEncoder hands its layers nested (padding-free) sequences in eval under no_grad with a
    # src_key_padding_mask; the attention crashed there ("NestedTensorImpl doesn't support sizes", reviewer V4,
    # the PyTorch-tutorial classifier's evaluation loop)
    encoder = _encoder_with_qk_norm()
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 6:] = True
    with torch.no_grad():
        nested = encoder(x, src_key_padding_mask=padding)
        encoder.use_nested_tensor = False  # the padded path, which always took the norms
        padded = encoder(x, src_key_padding_mask=padding)
    kept = ~padding
    torch.testing.assert_close(nested[kept], padded[kept], rtol=1e-5, atol=1e-5)
    assert (nested[padding] == 0).all()  # the encoder pads its nested output with zeros


def test_nested_input_other_than_self_attention_is_one_clear_error() -> None:
    attn = QKNormMultiheadAttention(8, 2, batch_first=True)
    q = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(ValueError, match="nested query = key = value with batch_first=True"):
        attn(q, q.clone(), q.clone())
