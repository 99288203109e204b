"""The clipped policy-gradient surrogate of PPO/GRPO with DAPO's decoupled clip (clip-higher) and token-level loss.

From Schulman et al. (2017), "Proximal Policy Optimization Algorithms" (arXiv 1707.06347), Shao et al. (2024),
"DeepSeekMath" (GRPO, arXiv 2402.03300), and Yu et al. (2025), "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale" (ByteDance Seed / Tsinghua AIR, arXiv 2503.14476). Note: keel's seed catalog row 4 describes an
unrelated "Direct Advantage Policy Optimization"; the clip-higher, token-level loss, overlong shaping and dynamic
sampling implemented here (and in `keel.losses.overlong`, `keel.losses.group_advantages`) are ByteDance's DAPO.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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
    masked_token_mean,
)

DAPO_EPS_LOW = 0.2
DAPO_EPS_HIGH = 0.28


class PolicyLoss(NamedTuple):
    """What `clipped_policy_loss` returns; every field a 0-d tensor (``kl`` None without a KL term).

    ``clip_low`` / ``clip_high`` are detached fractions in [0, 1] over the active tokens, TRL's
    ``clip_ratio/low_mean`` / ``high_mean``: hand them to ``Guard.step(loss, signals=...)`` under keel's
    ``RL_CLIP_LOW`` / ``RL_CLIP_HIGH`` keys. ``kl`` is the detached token mean of the KL term that was added.
    """

    loss: Tensor
    clip_low: Tensor
    clip_high: Tensor
    kl: Tensor | None


def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    eps_low: float = DAPO_EPS_LOW,
    eps_high: float = DAPO_EPS_HIGH,
    aggregation: str = "token",
    per_token_kl: Tensor | None = None,
    beta: float = 0.0,
) -> PolicyLoss:
    """Negative clipped surrogate ``−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)`` with ``ρ = exp(logp − logp_old)``.

    The defaults are DAPO's: the upper clip bound is raised to 1 + 0.28 (clip-higher) so that low-probability
    tokens with a positive advantage can still grow, which keeps the policy's entropy from collapsing; and the
    loss is a mean over *tokens* of the whole batch (DAPO Eq. 12), so a long response is not down-weighted.
    ``eps_high=eps_low`` with ``aggregation="sequence"`` gives GRPO's original objective (PPO's clip with a
    per-response mean). TRL maps these to ``epsilon``/``epsilon_high`` and ``loss_type="dapo"``/``"grpo"``.

    With ``per_token_kl`` (e.g. from `k3_kl`) and β > 0, ``β·kl`` is added per token before aggregation, as in
    GRPO/TRL; DAPO drops the KL term (β = 0, the default).

    Clip fractions follow TRL: low = ρ < 1 − ε_low where A < 0; high = ρ > 1 + ε_high where A > 0, each a
    fraction of the active tokens. With one optimisation pass per generation (TRL ``num_iterations=1``) ρ ≡ 1
    and both are 0 by construction.

    Half-precision inputs are computed in float32; float64 stays float64. NaN/±Inf propagate (no host sync);
    ρ is not clamped, as in TRL (OpenRLHF clamps the log-ratio to ±20), so ρ = inf with A < 0 gives an
    infinite loss that keel's Guard will skip.

    Args:
        logps: ``(batch, tokens)`` per-token log π_θ of the sampled response tokens (with gradient).
        old_logps: ``(batch, tokens)`` log π_old of the same tokens, from the policy that sampled them.
        advantages: ``(batch,)`` one advantage per response (e.g. `group_advantages`), or ``(batch, tokens)``.
        mask: Optional ``(batch, tokens)`` bool or 0/1 tensor, True for the response's real tokens.
        eps_low: Lower clip ε_low in [0, 1); 0.2 as PPO, GRPO and DAPO.
        eps_high: Upper clip ε_high >= ε_low; DAPO's 0.28.
        aggregation: ``"token"`` (DAPO, TRL ``"dapo"``) or ``"sequence"`` (GRPO's original, TRL ``"grpo"``).
        per_token_kl: Optional ``(batch, tokens)`` KL estimate to the reference policy.
        beta: Its weight β >= 0.

    Returns:
        `PolicyLoss` (``loss`` carries the gradient; the rest are detached).

    Raises:
        ValueError: a non-floating input, ``logps`` not 2-d or empty, mismatched shapes, ε_low outside [0, 1),
            ε_high < ε_low, β negative, β > 0 without ``per_token_kl``, or an unknown ``aggregation``.

    Example:
        >>> logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # old log-probs 0 → ratios 1.5, 0.5, 1.0
        >>> out = clipped_policy_loss(logps, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]))
        >>> out.loss  # −(min(1.5, 1.28) + min(−0.5, −0.8) + 1) / 3
        tensor(-0.4933)
        >>> out.clip_low, out.clip_high
        (tensor(0.3333), tensor(0.3333))

    References:
        Yu et al. (2025), DAPO, arXiv 2503.14476, Eq. 8–12; verl ``compute_policy_loss_vanilla``
        (``clip_ratio_low``/``clip_ratio_high``, ``loss_agg_mode="token-mean"``); TRL 1.16
        ``GRPOTrainer._compute_loss``.
    """
    eps_low = check_number("eps_low", eps_low, low=0.0, high=1.0)
    if eps_low == 1.0:
        raise ValueError("eps_low=1.0; allowed: a finite number in [0.0, 1.0) (the lower bound 1 − ε must be > 0)")
    if not isinstance(eps_high, (int, float)) or isinstance(eps_high, bool) or not eps_high >= eps_low:
        raise ValueError(f"eps_high={eps_high!r}; allowed: a finite number >= eps_low ({eps_low!r}); DAPO uses 0.28")
    eps_high = check_number("eps_high", eps_high, low=eps_low)
    beta = check_number("beta", beta, low=0.0)
    aggregation = check_aggregation(aggregation)
    check_floating("logps", logps, dim=2)
    check_nonempty("logps", logps)
    check_floating("old_logps", old_logps)
    check_shape("old_logps", old_logps, "logps", logps)
    check_floating("advantages", advantages)
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"advantages.shape={tuple(advantages.shape)}; allowed: (batch,) = {tuple(logps.shape[:1])} "
            f"or logps's shape {tuple(logps.shape)}"
        )
    mask = check_mask(mask, "logps", logps)
    if per_token_kl is not None:
        check_floating("per_token_kl", per_token_kl)
        check_shape("per_token_kl", per_token_kl, "logps", logps)
    elif beta > 0:
        raise ValueError(f"beta={beta!r} needs per_token_kl; allowed: beta=0 without a KL estimate")

    dtype = compute_dtype(logps, old_logps, advantages)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (batch,) → (batch, 1), broadcast over tokens
    ratio = torch.exp(logps.to(dtype) - old_logps.to(dtype))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if per_token_kl is not None:
        token_kl = per_token_kl.to(dtype)
        per_token = per_token + beta * token_kl
        kl = masked_token_mean(token_kl.detach(), mask)
    loss = aggregate(per_token, mask, aggregation)

    with torch.no_grad():
        low, high = clipped_sides(ratio, adv, eps_low, eps_high)
        clip_low = masked_token_mean(low.to(dtype), mask)
        clip_high = masked_token_mean(high.to(dtype), mask)
    return PolicyLoss(loss, clip_low, clip_high, kl)


def clipped_sides(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Where the clip binds, per token: (ρ < 1 − ε_low with A < 0, ρ > 1 + ε_high with A > 0), as booleans.

    These are the tokens whose gradient the clip removes (TRL's ``clip_ratio/low_mean`` and ``high_mean`` are
    their shares). ``advantages`` broadcasts against ``ratio`` (per response: shape ``(batch, 1)``).

    Example:
        >>> low, high = clipped_sides(torch.tensor([0.5, 1.5, 1.5]), torch.tensor([-1.0, 1.0, -1.0]), 0.2, 0.28)
        >>> low.tolist(), high.tolist()
        ([True, False, False], [False, True, False])
    """
    return (ratio < 1.0 - eps_low) & (advantages < 0), (ratio > 1.0 + eps_high) & (advantages > 0)
