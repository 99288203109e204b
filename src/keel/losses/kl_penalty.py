"""The k3 estimator of KL(π_θ ‖ π_ref) per token, with verl's optional clamps against overflow.

From J. Schulman (2020), "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html), as used by GRPO
(Shao et al. 2024, arXiv 2402.03300, Eq. 4), TRL and verl.
"""

from __future__ import annotations

import torch
from torch import Tensor

from keel.losses._checks import check_floating, check_number, check_shape, compute_dtype

VERL_LOG_RATIO_CLAMP = 20.0  # verl kl_penalty_forward("low_var_kl"): log-ratio clamped to ±20 before exp
VERL_KL_CLAMP = 10.0  # … and the estimate to ±10


def k3_kl(
    logps: Tensor,
    ref_logps: Tensor,
    *,
    log_ratio_clamp: float | None = None,
    kl_clamp: float | None = None,
) -> Tensor:
    """Per-token ``k3 = exp(d) − d − 1`` with ``d = log π_ref − log π_θ``: unbiased for KL(π_θ ‖ π_ref), >= 0.

    Without clamps this is TRL's estimator, and ``exp(d)`` overflows to inf once the policy drifts far from the
    reference (huggingface/trl#3015, open in TRL 1.16). verl clamps d to ±20 before ``exp`` and the result to
    ±10; pass ``log_ratio_clamp=VERL_LOG_RATIO_CLAMP, kl_clamp=VERL_KL_CLAMP`` for the same. A clamped token
    has zero gradient, so the clamp trades a bias on far-drifted tokens for a finite loss.

    Half precision is computed in float32; NaN propagates (a clamp does not hide NaN).

    Args:
        logps: ``(...)`` log π_θ of the sampled tokens.
        ref_logps: Same shape, log π_ref of the same tokens.
        log_ratio_clamp: None (TRL), or c > 0: d is clamped to [−c, c] first (verl: 20).
        kl_clamp: None (TRL), or m > 0: the estimate is clamped to [−m, m] (verl: 10).

    Returns:
        The per-token estimate, ``logps``'s shape; reduce it with the token mask (or pass it to
        `clipped_policy_loss` as ``per_token_kl``). Its masked token mean is keel's ``RL_KL`` signal (TRL ``kl``).

    Raises:
        ValueError: non-floating or mismatched inputs, or a clamp that is not a finite number > 0.

    Example:
        >>> k3_kl(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]))  # e − 1 − 1 for the second token
        tensor([0.0000, 0.7183])
        >>> k3_kl(torch.tensor([-50.0]), torch.tensor([0.0]), log_ratio_clamp=20.0, kl_clamp=10.0)
        tensor([10.])

    References:
        Schulman (2020); verl ``core_algos.kl_penalty_forward`` (``low_var_kl``/``k3``);
        TRL 1.16 ``GRPOTrainer._compute_loss`` (no clamp).
    """
    c = None if log_ratio_clamp is None else check_number("log_ratio_clamp", log_ratio_clamp, low=0.0, low_open=True)
    m = None if kl_clamp is None else check_number("kl_clamp", kl_clamp, low=0.0, low_open=True)
    check_floating("logps", logps)
    check_floating("ref_logps", ref_logps)
    check_shape("ref_logps", ref_logps, "logps", logps)
    dtype = compute_dtype(logps, ref_logps)
    log_ratio = ref_logps.to(dtype) - logps.to(dtype)
    if c is not None:
        log_ratio = log_ratio.clamp(-c, c)
    kl = torch.expm1(log_ratio) - log_ratio  # = exp(d) − d − 1, without the rounding below 0 that form has near d = 0
    return kl if m is None else kl.clamp(-m, m)
