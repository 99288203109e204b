"""QKNormMultiheadAttention: ``nn.MultiheadAttention`` with QK-norm on every head's queries and keys.

QK-norm from Dehghani et al. (2023, arXiv 2302.05442) and Wortsman et al. (2023, arXiv 2309.14322).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from keel.nn._surgery import parametrization_chain
from keel.nn.qk_norm import QKNorm


def _keep_out_of_fused_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook whose presence matters: ``nn.TransformerEncoderLayer`` takes a fused
    inference kernel that reads the projection weights directly, skipping this module's forward (and so
    the norms), unless a hook is attached."""


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose queries and keys are normalised per head (`QKNorm`) before q·kᵀ.

    It keeps ``nn.MultiheadAttention``'s parameters, state-dict keys, call signature and return value, so
    it drops into ``nn.TransformerEncoderLayer`` and friends; `from_module` converts an existing module
    sharing its Parameters. Not supported: ``add_bias_kv`` and ``add_zero_attn`` (ValueError).

    The forward reads ``in_proj_weight`` / ``out_proj.weight`` as attributes, so a parametrization on them
    (σReparam via `keel.stabilize`) applies.

    Args:
        embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first, device, dtype: As for
            ``nn.MultiheadAttention``.
        norm: ``"layer"`` or ``"rms"`` (see `QKNorm`).
        eps: The norms' ε.
        norm_bias: Whether the LayerNorms learn a bias; None follows ``bias``, the projections' convention.

    Example:
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True)
        >>> attn = QKNormMultiheadAttention.from_module(mha)
        >>> x = torch.randn(2, 5, 16)
        >>> attn(x, x, x)[0].shape
        torch.Size([2, 5, 16])

    References:
        Dehghani et al. (2023), arXiv 2302.05442; Wortsman et al. (2023), arXiv 2309.14322.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        norm: str = "layer",
        eps: float = 1e-5,
        norm_bias: bool | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        norm_bias = bias if norm_bias is None else norm_bias
        self.q_norm = QKNorm(self.head_dim, kind=norm, eps=eps, bias=norm_bias, device=device, dtype=dtype)
        self.k_norm = QKNorm(self.head_dim, kind=norm, eps=eps, bias=norm_bias, device=device, dtype=dtype)
        self.register_forward_pre_hook(_keep_out_of_fused_path)

    @classmethod
    def from_module(
        cls, mha: nn.MultiheadAttention, *, norm: str = "layer", eps: float = 1e-5, norm_bias: bool | None = None
    ) -> QKNormMultiheadAttention:
        """Convert ``mha``: the new module shares its Parameters and ``out_proj``; only the norms are new.

        ``norm_bias`` None gives the norms a bias when ``mha`` has an input-projection bias.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn; allowed: neither")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",
            norm=norm,
            eps=eps,
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            chain = parametrization_chain(mha, name)
            if chain is not None:  # e.g. σReparam applied first: carry it over
                setattr(new, name, chain.original)
                for parametrization in chain:
                    parametrize.register_parametrization(new, name, parametrization, unsafe=True)
            else:
                setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        reference = next(mha.parameters())
        norm_bias = mha.in_proj_bias is not None if norm_bias is None else norm_bias
        device, dtype = reference.device, reference.dtype
        new.q_norm = QKNorm(new.head_dim, kind=norm, eps=eps, bias=norm_bias, device=device, dtype=dtype)
        new.k_norm = QKNorm(new.head_dim, kind=norm, eps=eps, bias=norm_bias, device=device, dtype=dtype)
        new.train(mha.training)
        return new

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            q, k, v = self.in_proj_weight.chunk(3)
            return q, k, v
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, need_weights, attn_mask, average_attn_weights)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # → (B, L, E)
        w_q, w_k, w_v = self._projections()
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        B, L, _ = query.shape
        S = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_norm(F.linear(query, w_q, b_q).view(B, L, heads, head_dim)).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_norm(F.linear(key, w_k, b_k).view(B, S, heads, head_dim)).transpose(1, 2)  # (B, H, S, hd)
        v = F.linear(value, w_v, b_v).view(B, S, heads, head_dim).transpose(1, 2)  # (B, H, S, hd)
        bias = _additive_mask(attn_mask, key_padding_mask, B, heads, L, S, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, H, L, S)
            if bias is not None:
                logits = logits + bias
            weights = logits.softmax(dim=-1)
            out = F.dropout(weights, p=dropout, training=self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = F.linear(out.transpose(1, 2).reshape(B, L, self.embed_dim), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        return out, weights

    def _forward_nested(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Self-attention over nested (padding-free) sequences, which ``nn.TransformerEncoder`` hands its layers in
        eval under ``no_grad`` with a ``src_key_padding_mask``: padded, attended with the padding masked, and
        nested again. (``nn.MultiheadAttention`` takes them in its fused kernel, which skips the norms.)"""
        if not (query is key and key is value and self.batch_first):
            raise ValueError(
                "QKNormMultiheadAttention got nested tensors other than one batch_first self-attention input; "
                "allowed: nested query = key = value with batch_first=True (nn.TransformerEncoder's inference "
                "path), else padded tensors with key_padding_mask"
            )
        lengths = [t.shape[0] for t in query.unbind()]
        padded = query.to_padded_tensor(0.0)
        positions = torch.arange(padded.shape[1], device=padded.device)
        padding = positions >= torch.tensor(lengths, device=padded.device).unsqueeze(1)  # (B, L) True = padding
        out, weights = self(
            padded,
            padded,
            padded,
            key_padding_mask=padding,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
        )
        rows = [o[:n] for o, n in zip(out.unbind(), lengths, strict=True)]
        return torch.nested.as_nested_tensor(rows, layout=query.layout), weights


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    B: int,
    H: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.MultiheadAttention's masks (bool True = blocked, or additive floats) as one additive bias."""
    bias = None
    if attn_mask is not None:
        mask = _to_additive(attn_mask, dtype)
        bias = mask.view(B, H, L, S) if mask.dim() == 3 else mask  # (B·H, L, S) or (L, S)
    if key_padding_mask is not None:
        pad = _to_additive(key_padding_mask, dtype).view(B, 1, 1, S)
        bias = pad if bias is None else bias + pad
    return bias


def _to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
