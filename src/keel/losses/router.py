"""Mixture-of-experts router losses: ST-MoE's router z-loss and the Switch load-balancing loss.

Both are normalised as Megatron-LM and OLMo-core normalise them (reference/domain-anchors.md §1.1): the balancing
loss is 1 for a perfectly balanced router and E/k when every token goes to the same k experts. Hugging Face's
``load_balancing_loss_func`` gives k times this value (divide it by k to compare).
"""

from __future__ import annotations

import torch
from torch import Tensor

from keel.losses._checks import check_floating, check_number
from keel.losses.z_loss import log_partition, masked_log_partition, z_loss_from_log_z

# ST-MoE's router z-loss coefficient; Megatron's moe_z_loss_coeff docstring: "1e-3 is a good start".
ROUTER_Z_LOSS_COEFFICIENT = 1e-3
# Switch / Megatron moe_aux_loss_coeff recommendation; OLMo-core's lb_loss_weight.
LOAD_BALANCING_COEFFICIENT = 1e-2


def router_z_loss(
    logits: Tensor, *, coefficient: float = ROUTER_Z_LOSS_COEFFICIENT, mask: Tensor | None = None
) -> Tensor:
    """ST-MoE router z-loss: ``coefficient · mean over tokens of (logsumexp_j x_j)²``.

    It keeps the router's logits small, so the softmax over experts does not saturate in low precision; its
    gradient is ``2·coefficient·lse·softmax(x) / n_tokens``. ``coefficient=1`` gives the unscaled value that
    Megatron and OLMo-core log as "z_loss".

    Args:
        logits: ``(..., E)`` raw router logits (upcast to float32 when half precision).
        coefficient: Weight of the penalty (1e-3, ST-MoE).
        mask: Optional boolean ``(...)`` tensor, True for tokens that count (e.g. not padding); masked-out
            tokens count for nothing in value and gradient, whatever their logits (NaN, all −inf).

    Returns:
        A 0-d tensor; 0 for no tokens.

    Raises:
        ValueError: ``logits`` is not a floating tensor, ``coefficient`` is not a finite number >= 0, or ``mask``
            does not have the tokens' shape.

    Example:
        >>> round(router_z_loss(torch.zeros(3, 4), coefficient=1.0).item(), 4)  # lse = log 4 for every token
        1.9218

    References:
        Zoph et al. (2022), "ST-MoE: Designing Stable and Transferable Sparse Expert Models", arXiv 2202.08906,
        eq. 5; Megatron-LM ``moe_utils.z_loss_func``; OLMo-core ``nn/moe/loss.py`` (``router_z_loss``).
    """
    check_floating("logits", logits)
    log_z = log_partition(logits) if mask is None else masked_log_partition(logits, mask)
    return z_loss_from_log_z(log_z, coefficient=coefficient, mask=mask)


def tokens_per_expert(chosen: Tensor, num_experts: int) -> Tensor:
    """How many token assignments each expert received: ``(E,)`` float32 counts of the indices in ``chosen``.

    Indices outside ``[0, E)`` (a dropped-token sentinel such as Hugging Face's ``E``) are not counted.

    Counted by a 1-D ``scatter_add_`` into ``E`` slots: every shape is known before the data, so ``torch.compile``
    traces it without a break (boolean indexing and ``bincount`` made two per MoE layer), and it is deterministic
    on CUDA under ``torch.use_deterministic_algorithms``.
    """
    flat = chosen.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, torch.where(valid, flat, 0), valid.long()).float()


def load_balancing_loss(logits: Tensor, chosen: Tensor, *, coefficient: float = LOAD_BALANCING_COEFFICIENT) -> Tensor:
    """Switch load-balancing loss ``coefficient · E · Σ_i f_i · P_i``: 1 (unscaled) balanced, E/k collapsed.

    f_i is the fraction of the T·k token assignments that went to expert i (Megatron divides by T·k, so the value
    does not grow with k) and P_i the mean router probability of expert i over the tokens. f is a count and carries
    no gradient; the gradient reaches the router through P, pushing probability away from overloaded experts.

    Args:
        logits: ``(T, E)`` raw router logits (any leading shape; the last axis is the experts).
        chosen: ``(T, k)`` integer indices of the experts each token was dispatched to.
        coefficient: α (1e-2, Switch and Megatron); ``coefficient=1`` gives the unscaled value.

    Returns:
        A 0-d float32 tensor (float64 for float64 logits); 0 for no tokens.

    Raises:
        ValueError: ``logits`` is not floating, ``chosen`` is not an integer tensor with one row per token, or
            ``coefficient`` is not a finite number >= 0.

    Example:
        >>> logits = torch.zeros(4, 4)                              # uniform router
        >>> balanced = torch.tensor([[0], [1], [2], [3]])
        >>> load_balancing_loss(logits, balanced, coefficient=1.0).item()
        1.0

    References:
        Fedus et al. (2021), "Switch Transformers", arXiv 2101.03961, eq. 4; Megatron-LM
        ``moe_utils.switch_load_balancing_loss_func``; OLMo-core ``nn/moe/loss.py``.
    """
    check_floating("logits", logits)
    coefficient = check_number("coefficient", coefficient, low=0.0)
    if not isinstance(chosen, Tensor) or chosen.is_floating_point() or chosen.is_complex():
        got = f"a {chosen.dtype} tensor" if isinstance(chosen, Tensor) else type(chosen).__name__
        raise ValueError(f"chosen is {got}; allowed: an integer tensor of expert indices (tokens, k)")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if chosen.dim() != logits.dim() or chosen.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"chosen.shape={tuple(chosen.shape)}; allowed: one row of expert indices per token, "
            f"{tuple(logits.shape[:-1])} + (k,)"
        )
    probs = logits.reshape(-1, logits.shape[-1]).softmax(dim=-1)
    num_tokens, num_experts = probs.shape
    if num_tokens == 0 or chosen.numel() == 0:
        return probs.sum()  # 0 with a graph: an empty batch balances nothing
    fraction = tokens_per_expert(chosen, num_experts).to(probs.dtype) / chosen.numel()
    return coefficient * num_experts * (fraction * probs.mean(dim=0)).sum()
