"""Preference-optimisation signals (DPO and its kin) from the log-probabilities a loop already has.

A DPO loop computes, per pair, the summed log-probability of the chosen and the rejected response under the policy
(and under the reference). `preference_signals` turns them into keel's ``pref/…`` signals: 0-d tensors, still on the
device, that the loop hands to ``guard.step(loss, signals=...)``. Nothing is copied to the host here.

| key                             | needs                         | value (batch mean)                               |
|---------------------------------|-------------------------------|--------------------------------------------------|
| `pref/chosen_logp`              | always                        | Σₜ log π(y⁺ₜ|x, y⁺<ₜ)                            |
| `pref/rejected_logp`            | always                        | the same for y⁻                                  |
| `pref/chosen_logp_token`        | ``chosen_tokens``             | Σₜ log π(y⁺ₜ|…) / |y⁺|                           |
| `pref/rejected_logp_token`      | ``rejected_tokens``           | the same for y⁻                                  |
| `pref/chosen_reward`            | the reference                 | β·(log π(y⁺|x) − log π_ref(y⁺|x))                |
| `pref/rejected_reward`          | the reference                 | the same for y⁻                                  |
| `pref/margin`                   | the reference                 | chosen reward − rejected reward                  |
| `pref/accuracy`                 | the reference                 | 1[chosen reward > rejected reward]               |
| `pref/chosen_displacement`      | the reference                 | (log π(y⁺|x) − log π_ref(y⁺|x)) / |y⁺|           |

Cost: a handful of element-wise operations and means over the batch (O(batch)), no extra forward pass; every step.
The rewards are DPO's implicit rewards, and match TRL 1.16's ``rewards/chosen``, ``rewards/margins`` and
``rewards/accuracies``; TRL's ``logps/chosen`` is the summed form (``pref/chosen_logp``).

Likelihood displacement (Razin et al. 2025, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization", ICLR, arXiv 2410.08847; code github.com/princeton-nlp/unintentional-unalignment) is the
chosen response's log-probability falling below where it started while the margin still grows. With the reference
at the starting policy, ``pref/chosen_displacement`` is that drift per token (per sequence when ``chosen_tokens`` is
not given): 0 at the start, negative once the chosen response is displaced.

Non-finite values are measurements too: a NaN or ±Inf log-probability makes every mean it enters NaN or ±Inf (the
accuracy of a pair whose rewards are NaN is NaN, not 0), so the detectors see it. A pair whose token count is 0 or
negative has a NaN per-token value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from keel._core import keys
from keel.signals._describe import describe


def preference_signals(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> dict[str, Tensor]:
    """keel's ``pref/…`` signals of one batch of preference pairs, as 0-d tensors on the inputs' device.

    Use it in a DPO/IPO/ORPO loop that computes per-sequence log-probabilities anyway, and pass the result to
    ``guard.step(loss, signals=...)``; the detectors of `keel.detect.preference_detectors` read them. No host sync.

    Args:
        chosen_logps: ``(batch,)`` summed log-probabilities of the chosen responses under the policy.
        rejected_logps: ``(batch,)`` the same for the rejected responses.
        ref_chosen_logps: ``(batch,)`` the chosen responses under the reference policy; with
            ``ref_rejected_logps``, adds the rewards, margin, accuracy and the chosen displacement.
        ref_rejected_logps: ``(batch,)`` the rejected responses under the reference policy.
        beta: DPO's β (> 0), the scale of the implicit rewards.
        chosen_tokens: ``(batch,)`` response-token counts of the chosen responses: adds per-token means.
        rejected_tokens: ``(batch,)`` the same for the rejected responses.

    Returns:
        Signal key → 0-d detached tensor (float32, or float64 for float64 inputs); only the keys the inputs allow.

    Raises:
        ValueError: a log-probability that is not a non-empty 1-d floating tensor, shapes that differ, one reference
            without the other, token counts of another shape, or a ``beta`` that is not a finite number > 0.

    Example:
        >>> import torch
        >>> from keel._core import keys
        >>> out = preference_signals(torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0]),
        ...                          ref_chosen_logps=torch.tensor([-11.0, -12.0]),
        ...                          ref_rejected_logps=torch.tensor([-13.0, -12.0]), beta=0.5)
        >>> out[keys.PREF_MARGIN], out[keys.PREF_ACCURACY]  # pair 1: 0.5 − (−0.5); pair 2: 0 − 0.5
        (tensor(0.2500), tensor(0.5000))
    """
    chosen = _logps("chosen_logps", chosen_logps)
    rejected = _logps("rejected_logps", rejected_logps, like=chosen)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps: one is given, the other None; allowed: both (the reference "
            "policy's log-probabilities of the same pairs) or neither"
        )
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r}; allowed: a finite number > 0 (DPO's β, e.g. 0.1)")
    out = {keys.PREF_CHOSEN_LOGP: chosen.mean(), keys.PREF_REJECTED_LOGP: rejected.mean()}
    chosen_count = _tokens("chosen_tokens", chosen_tokens, chosen)
    rejected_count = _tokens("rejected_tokens", rejected_tokens, chosen)
    if chosen_count is not None:
        out[keys.PREF_CHOSEN_LOGP_TOKEN] = _per_token(chosen, chosen_count).mean()
    if rejected_count is not None:
        out[keys.PREF_REJECTED_LOGP_TOKEN] = _per_token(rejected, rejected_count).mean()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        return out
    chosen_ratio = chosen - _logps("ref_chosen_logps", ref_chosen_logps, like=chosen)
    rejected_ratio = rejected - _logps("ref_rejected_logps", ref_rejected_logps, like=chosen)
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    margin = chosen_reward - rejected_reward
    right = (chosen_reward > rejected_reward).to(margin.dtype)
    out[keys.PREF_CHOSEN_REWARD] = chosen_reward.mean()
    out[keys.PREF_REJECTED_REWARD] = rejected_reward.mean()
    out[keys.PREF_MARGIN] = margin.mean()
    out[keys.PREF_ACCURACY] = torch.where(margin.isnan(), margin, right).mean()  # a NaN pair is no "wrong" pair
    displaced = chosen_ratio if chosen_count is None else _per_token(chosen_ratio, chosen_count)
    out[keys.PREF_CHOSEN_DISPLACEMENT] = displaced.mean()
    return out


def _logps(name: str, value: object, like: Tensor | None = None) -> Tensor:
    """``value`` as a detached 1-d tensor in at least float32, or one ValueError naming ``name``."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 1 or value.numel() == 0:
        raise ValueError(
            f"{name}={describe(value)}; allowed: a non-empty 1-d floating tensor of shape (batch,), one summed "
            "log-probability per sequence"
        )
    if like is not None and (value.shape != like.shape or value.device != like.device):
        raise ValueError(
            f"{name} is {describe(value)} on {value.device}, chosen_logps of shape {tuple(like.shape)} on "
            f"{like.device}; allowed: the same shape (batch,) on the same device"
        )
    return value.detach().to(torch.promote_types(value.dtype, torch.float32))


def _tokens(name: str, value: object, like: Tensor) -> Tensor | None:
    """Token counts as a tensor of ``like``'s dtype, or None; one ValueError for any other shape or type."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.is_complex() or value.dtype == torch.bool or value.shape != like.shape:
        raise ValueError(
            f"{name}={describe(value)}; allowed: a real tensor of shape {tuple(like.shape)} (one token count per "
            "sequence), or None"
        )
    return value.detach().to(like.device, like.dtype)  # host counts go to the device: a copy there, no sync


def _per_token(logps: Tensor, counts: Tensor) -> Tensor:
    """``logps / counts``, NaN where a count is not positive (no tokens: no per-token value)."""
    return torch.where(counts > 0, logps / counts, torch.full_like(logps, math.nan))
