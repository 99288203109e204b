"""ProxyGPT: a small GPT-style transformer family that shows the classic instabilities on a CPU.

Pre-LayerNorm blocks with attention written out explicitly (``q @ kᵀ``) rather than through
``scaled_dot_product_attention``, so the attention logits exist as a tensor that probes can reduce and
stabilizers (QK-norm) can act on. The output head is untied from the embedding so output-logit drift
can happen, as in the models of Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer
training instabilities" (arXiv 2309.14322).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.validate import check_types, require_ints
from keel.proxy.moe import MoeConfig, MoeMLP


@dataclass(kw_only=True)
class ProxyConfig:
    """Shape of a proxy model.

    Attributes:
        vocab_size: Number of token ids (256 for the byte-level proxy corpus).
        seq_len: Longest sequence the positional embedding covers.
        d_model: Residual width.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per block; must divide ``d_model``.
        mlp_ratio: Hidden width of the MLP as a multiple of ``d_model``.
        qk_norm: LayerNorm on queries and keys before the dot product (Dehghani et al. 2023).
        moe: Mixture-of-experts routing for every block's MLP (`keel.proxy.moe.MoeMLP`); None keeps them dense.
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    qk_norm: bool = False
    moe: MoeConfig | None = None

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio")
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"ProxyConfig.moe={self.moe!r}; allowed: None or a keel.proxy.MoeConfig")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ProxyConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "allowed: d_model a multiple of n_heads"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if config.qk_norm else nn.Identity()
        # keel's attention probes hook the masked logits here instead of intercepting the forward pass
        self.logits_tap = nn.Identity()
        mask = torch.ones(config.seq_len, config.seq_len, dtype=torch.bool).tril()
        self.causal_mask: Tensor
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        logits = self.logits_tap(logits.masked_fill(~self.causal_mask[:T, :T], float("-inf")))
        y = logits.softmax(dim=-1) @ v  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp: nn.Module
        if config.moe is None:
            self.mlp = MLP(config)
        else:  # each expert is a copy of the dense MLP (Switch)
            self.mlp = MoeMLP(config.d_model, config.moe, expert=lambda: MLP(config))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ProxyGPT(nn.Module):
    """A byte-level causal language model; ``forward(idx)`` returns logits ``(B, T, vocab)``.

    Example:
        >>> model = ProxyGPT(ProxyConfig(d_model=32, n_layers=1, n_heads=2))
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02) for weights; LayerNorm stays at (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds ProxyConfig.seq_len={self.config.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


PROXY_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2),
    "small": dict(d_model=128, n_layers=2, n_heads=4),
    "medium": dict(d_model=192, n_layers=3, n_heads=6),
    "large": dict(d_model=256, n_layers=4, n_heads=8),
    # GPT-2 small's body (85M parameters in its blocks, as GPT-2 small has): the size of issue 13's GPU
    # overhead figures. The byte vocabulary keeps its embeddings small, so it is 85M in all rather than 124M.
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12),
}


def list_proxy_sizes() -> list[str]:
    """Names of the proxy model family, smallest first."""
    return list(PROXY_SIZES)


def create_proxy_model(size: str = "small", **overrides: object) -> ProxyGPT:
    """Build a proxy model by size name, with any `ProxyConfig` field overridden.

    Example:
        >>> create_proxy_model("tiny", qk_norm=True).config.qk_norm
        True
    """
    if size not in PROXY_SIZES:
        raise ValueError(f"unknown proxy size {size!r}; allowed: {', '.join(PROXY_SIZES)}")
    return ProxyGPT(ProxyConfig(**{**PROXY_SIZES[size], **overrides}))  # type: ignore[arg-type]
