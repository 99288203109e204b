"""Pure tensor statistics of attention logits: the largest logit, the entropy per head, and the logits of
fused attention calls rebuilt from their arguments.

Attention-logit growth (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters",
arXiv 2302.05442; Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322) shows in the largest pre-softmax logit; entropy collapse (Zhai et al.
2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", arXiv 2303.06296;
code: github.com/apple/ml-sigma-reparam) in the mean entropy of the attention rows.

Masks: a masked entry is ``-inf`` (``masked_fill``) or the dtype's most negative number added to the
logit (Hugging Face's additive masks). Entries at or below half the dtype's minimum count as masked, so a
mask never wins a maximum and a fully masked row is left out of the entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_floor(dtype: torch.dtype) -> float:
    """Logits at or below this value are masked entries (half the dtype's most negative number)."""
    return torch.finfo(dtype).min / 2 if dtype.is_floating_point else -math.inf


def attention_max_logit(logits: Tensor) -> Tensor:
    """The largest unmasked pre-softmax attention logit, as a 0-d float32 tensor.

    The signed maximum, as Megatron-LM's ``max_attention_logit`` and MuonClip's QK-clip use it: masks are
    very negative, so they never win it. ``-inf`` when every entry is masked; NaN when a logit is NaN.

    Args:
        logits: Pre-softmax logits of any shape (e.g. ``(batch, heads, queries, keys)``), masks included.

    Example:
        >>> z = torch.tensor([[1.0, float("-inf")], [3.0, -2.0]])
        >>> attention_max_logit(z)
        tensor(3.)
    """
    if logits.numel() == 0:
        return torch.tensor(-math.inf, device=logits.device)
    top = logits.detach().amax().float()
    return torch.where(top <= masked_floor(logits.dtype), torch.full_like(top, -math.inf), top)  # NaN stays


def attention_entropy_sums(
    logits: Tensor, probs: Tensor | None = None, *, head_dim: int | None = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head sums of row entropies, counts of unmasked rows, and the largest logit (one pass).

    The building block of `attention_entropy` that hooks accumulate across micro-batches without keeping
    activations. Entropy is −Σⱼ pᵢⱼ log pᵢⱼ in nats over the last dimension, in float32.

    Args:
        logits: Pre-softmax logits, the key dimension last.
        probs: The softmax the model computed, reused when it is float32/float64; else recomputed in float32
            from ``logits`` (a bf16/fp16 softmax carries rounding the entropy should not inherit).
        head_dim: The dimension that indexes heads; ``None`` treats everything as one head.

    Returns:
        ``(sums, counts, max_logit)``: float32 vectors with one entry per head, and a 0-d float32 tensor.
    """
    z = logits.detach()
    row_max = z.amax(dim=-1)
    top = row_max.amax().float() if row_max.numel() else torch.tensor(-math.inf, device=z.device)
    floor = masked_floor(z.dtype)
    top = torch.where(top <= floor, torch.full_like(top, -math.inf), top)
    valid = ~(row_max <= floor)  # NaN rows stay "valid", so a NaN shows in the entropy
    if probs is None or probs.dtype not in (torch.float32, torch.float64) or probs.shape != z.shape:
        probs = F.softmax(z.float(), dim=-1)
    entropy = -torch.special.xlogy(probs.detach(), probs.detach()).sum(dim=-1).float()  # rows
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    if head_dim is None or z.dim() < 3:
        return entropy.sum().reshape(1), valid.sum().float().reshape(1), top
    head_dim = head_dim % z.dim()
    rows = [d for d in range(z.dim() - 1) if d != head_dim]
    return entropy.sum(dim=rows), valid.sum(dim=rows).float(), top


def attention_entropy(logits: Tensor, *, head_dim: int | None = 1) -> Tensor:
    """Mean attention entropy per head (nats), over all unmasked rows; NaN for a head with none.

    Example:
        >>> z = torch.zeros(1, 2, 3, 4)          # uniform over 4 keys: entropy log 4
        >>> attention_entropy(z)
        tensor([1.3863, 1.3863])
    """
    sums, counts, _ = attention_entropy_sums(logits, head_dim=head_dim)
    return sums / counts


def sdpa_logits(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The float32 logits ``scaled_dot_product_attention`` would feed its softmax, masks included.

    Follows the reference implementation in the PyTorch documentation: scale ``1/sqrt(E)`` unless given,
    ``is_causal`` keeps the lower triangle aligned top-left, a boolean mask keeps ``True`` entries, a float
    mask is added, ``enable_gqa`` repeats key heads to match query heads.

    Example:
        >>> q = torch.ones(1, 1, 2, 4); k = torch.ones(1, 1, 2, 4)
        >>> sdpa_logits(q, k, is_causal=True)
        tensor([[[[2., -inf],
                  [2., 2.]]]])
    """
    q, k = query.detach(), key.detach()
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
    factor = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)).float() * factor
    L, S = logits.shape[-2:]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        else:
            logits = logits + attn_mask.detach().float()
    return logits
