"""Tiny models the stabilize tests share: a nanoGPT-style GPT written the way nanoGPT writes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: an optional bias (PyTorch's LayerNorm had no ``bias=False`` when it was written)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, F.scaled_dot_product_attention."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    """Embedding → (LayerNorm → attention) residual blocks → tied LM head; ``bias`` as nanoGPT's GPTConfig."""

    def __init__(self, vocab: int = 50, n_embd: int = 16, n_head: int = 2, n_layer: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.ln = nn.ModuleList(LayerNorm(n_embd, bias) for _ in range(n_layer))
        self.attn = nn.ModuleList(NanoAttention(n_embd, n_head, bias) for _ in range(n_layer))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for ln, attn in zip(self.ln, self.attn, strict=True):
            x = x + attn(ln(x))
        return self.lm_head(x)


def nanogpt_optimizer(model: nn.Module, weight_decay: float = 0.1, lr: float = 6e-4) -> torch.optim.AdamW:
    """nanoGPT's ``configure_optimizers``: matrices decay, every 1-D parameter (gains, biases) does not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``ids`` (B, T)."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


class SelfAttention(nn.Module):
    """keel's QK-norm multi-head attention as a one-input module (the compile and low-precision tests' case)."""

    def __init__(self) -> None:
        super().__init__()
        from keel.nn import QKNormMultiheadAttention

        self.attn = QKNormMultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]
