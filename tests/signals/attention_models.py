"""Tiny attention models and float64 references shared by the attention-probe tests."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ref_stats(logits: np.ndarray, head_axis: int | None = 1) -> tuple[float, np.ndarray]:
    """float64 reference: (max over unmasked entries, mean row entropy per head).

    Masked entries are -inf or <= float64-min/2; rows with no unmasked entry are left out.
    """
    z = np.asarray(logits, dtype=np.float64)
    masked = ~(z > np.finfo(np.float32).min / 2) & ~np.isnan(z)
    valid_values = z[~masked]
    top = float(valid_values.max()) if valid_values.size else -math.inf
    if head_axis is None:
        z = z.reshape(1, 1, -1, z.shape[-1])
        masked = masked.reshape(z.shape)
        head_axis = 1
    z = np.moveaxis(z, head_axis, 0)
    masked = np.moveaxis(masked, head_axis, 0)
    heads = []
    for h in range(z.shape[0]):
        rows = z[h].reshape(-1, z.shape[-1])
        rmask = masked[h].reshape(-1, z.shape[-1])
        entropies = []
        for row, m in zip(rows, rmask, strict=True):
            if m.all():
                continue
            x = row[~m]
            p = np.exp(x - x.max())
            p /= p.sum()
            entropies.append(float(-(p[p > 0] * np.log(p[p > 0])).sum()))
        heads.append(np.mean(entropies) if entropies else math.nan)
    return top, np.array(heads)


class FlashSelfAttention(nn.Module):
    """nanoGPT-style causal self-attention on the flash path (``F.scaled_dot_product_attention``)."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        shape = (B, T, self.heads, C // self.heads)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qk(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))


class CausalSelfAttention(FlashSelfAttention):
    """The same block on nanoGPT's slow path: explicit ``q @ kᵀ``, ``masked_fill``, ``F.softmax``."""

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qk(x)
        T = x.shape[1]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
        att = F.softmax(att, dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(x.shape))


class TwoLayer(nn.Module):
    """Two attention layers of one kind with a head, so blocks and output head can be found."""

    def __init__(self, layer: type[nn.Module], d: int = 16, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([layer(d), layer(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def explicit_logits(block: FlashSelfAttention, x: Tensor) -> Tensor:
    """float64 causal logits of a `FlashSelfAttention` from its weights: the reference for both paths."""
    with torch.no_grad():
        q, k, _ = block.double().qk(x.double())
        block.float()
    T = x.shape[1]
    z = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return z.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))


def block_inputs(model: TwoLayer, idx: Tensor) -> list[Tensor]:
    """The input of each block in a forward pass (float32)."""
    seen: list[Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    return seen
