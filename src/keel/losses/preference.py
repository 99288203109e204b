"""Preference losses: sigmoid DPO with its implicit rewards, and the SFT-on-chosen regularizer (RPO / TRL "sft").

From Rafailov et al. (2023), "Direct Preference Optimization" (arXiv 2305.18290), and Pang et al. (2024),
"Iterative Reasoning Preference Optimization" (arXiv 2404.19733), whose NLL term on the chosen response is TRL's
``loss_type=["sigmoid", "sft"]``. The NLL anchor is a cited remedy for likelihood displacement, where DPO lowers
log π(y⁺|x) while the margin grows (Razin et al. 2025, arXiv 2410.08847; huggingface/trl#800).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from keel.losses._checks import (
    aggregate,
    check_aggregation,
    check_floating,
    check_mask,
    check_nonempty,
    check_number,
    check_shape,
    compute_dtype,
)

DEFAULT_BETA = 0.1  # TRL DPOConfig.beta


class DPOLoss(NamedTuple):
    """What `dpo_loss` returns: the loss to backpropagate and the per-pair implicit rewards (detached)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = DEFAULT_BETA,
) -> DPOLoss:
    """Sigmoid DPO loss ``−mean log σ(β[(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))])``.

    Use it in your own preference loop; TRL's ``DPOTrainer`` computes the same for ``loss_type="sigmoid"``.
    The inputs are *summed* response log-probabilities per pair, as TRL uses. The implicit reward of a response
    is ``β·(log π(y|x) − log π_ref(y|x))`` (the partition term β log Z(x) is left out); their batch means are
    TRL's ``rewards/chosen`` and ``rewards/rejected``, and can be handed to keel as ``PREF_CHOSEN_REWARD`` /
    ``PREF_REJECTED_REWARD`` signals.

    Half-precision inputs are computed in float32 (TRL upcasts after the fp16 NaN rewards of
    huggingface/trl#878); float64 stays float64. NaN or ±Inf inputs propagate to the loss (checking them would
    sync the device every step); keel's Guard records a non-finite loss and skips that step.

    Args:
        chosen_logps: ``(batch,)`` log π(y⁺|x), summed over the chosen response's tokens.
        rejected_logps: ``(batch,)`` log π(y⁻|x).
        ref_chosen_logps: ``(batch,)`` the same under the reference policy (no gradient needed).
        ref_rejected_logps: ``(batch,)``.
        beta: The KL-penalty strength β > 0; TRL's default 0.1. β = 0 is refused: it makes the loss a constant
            log 2 with zero rewards (huggingface/trl#1311).

    Returns:
        `DPOLoss`: ``loss`` (0-d, the mean over pairs), ``chosen_rewards`` and ``rejected_rewards`` (``(batch,)``,
        detached).

    Raises:
        ValueError: a non-floating or non-1-d input, mismatched shapes, an empty batch, or β not finite and > 0.

    Example:
        >>> import torch
        >>> out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0]))
        >>> round(out.loss.item(), 4)  # −log σ(0.1·((−5+6) − (−9+8))) = −log σ(0.2)
        0.5981
        >>> out.chosen_rewards, out.rejected_rewards
        (tensor([0.1000]), tensor([-0.1000]))

    References:
        Rafailov et al. (2023), arXiv 2305.18290, Eq. 7; TRL 1.16 ``DPOTrainer._compute_loss`` (``"sigmoid"``).
    """
    beta = check_number("beta", beta, low=0.0, low_open=True)
    check_floating("chosen_logps", chosen_logps, dim=1)
    check_nonempty("chosen_logps", chosen_logps)
    for name, other in (
        ("rejected_logps", rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        check_floating(name, other)
        check_shape(name, other, "chosen_logps", chosen_logps)
    dtype = compute_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_ratio = rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    # logsigmoid, not log(sigmoid): stays finite when the margin is large and negative
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return DPOLoss(loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def chosen_sft_loss(
    chosen_token_logps: Tensor,
    mask: Tensor | None = None,
    *,
    alpha: float = 1.0,
    aggregation: str = "token",
) -> Tensor:
    """The SFT-on-chosen regularizer ``α · NLL(y⁺)``: add it to `dpo_loss` to anchor log π(y⁺|x).

    DPO optimises only the margin, so the chosen response's likelihood can fall (likelihood displacement).
    An NLL term on the chosen tokens holds it up. ``aggregation="token"`` (default) is TRL 1.16's ``"sft"``
    loss: the mean NLL over every chosen token in the batch. ``"sequence"`` averages each response's per-token
    NLL first, the length-normalised form of RPO (Pang et al. 2024, Eq. 2).

    Half-precision inputs are computed in float32; NaN/±Inf propagate (see `dpo_loss`).

    Args:
        chosen_token_logps: ``(batch, tokens)`` per-token log π of the chosen response (0 or anything at
            masked positions).
        mask: Optional ``(batch, tokens)`` bool or 0/1 tensor, True for the response's real tokens.
        alpha: Weight α ≥ 0 of the term (TRL: the ``loss_weights`` entry of ``"sft"``; RPO used α = 1).
        aggregation: ``"token"`` or ``"sequence"``.

    Returns:
        A 0-d tensor. An all-False mask gives 0, not NaN.

    Raises:
        ValueError: a non-floating or non-2-d input, an empty batch, a mask of another shape, α negative or not
            finite, or an unknown ``aggregation``.

    Example:
        >>> import torch
        >>> logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> chosen_sft_loss(logps, mask)  # (1 + 2 + 3) / 3 tokens
        tensor(2.)
        >>> chosen_sft_loss(logps, mask, aggregation="sequence")  # (1.5 + 3) / 2 responses
        tensor(2.2500)

    References:
        Pang et al. (2024), "Iterative Reasoning Preference Optimization", arXiv 2404.19733;
        TRL 1.16 ``DPOTrainer._compute_loss`` (``loss_type="sft"``); huggingface/trl#800, #1686.
    """
    alpha = check_number("alpha", alpha, low=0.0)
    aggregation = check_aggregation(aggregation)
    check_floating("chosen_token_logps", chosen_token_logps, dim=2)
    check_nonempty("chosen_token_logps", chosen_token_logps)
    mask = check_mask(mask, "chosen_token_logps", chosen_token_logps)
    nll = -chosen_token_logps.to(compute_dtype(chosen_token_logps))
    return alpha * aggregate(nll, mask, aggregation)
