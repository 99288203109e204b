"""DAPO's soft overlong punishment: a length-aware reward penalty that ramps from 0 to −1 over a buffer.

From Yu et al. (2025), "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (ByteDance Seed /
Tsinghua AIR, arXiv 2503.14476), Eq. 13. (keel's seed catalog row 4, "Direct Advantage Policy Optimization",
is a different paper; this is ByteDance's DAPO.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DAPO_MAX_LENGTH = 20480  # L_max in the DAPO paper and verl's recipe
DAPO_CACHE_LENGTH = 4096  # L_cache


def soft_overlong_punishment(
    lengths: Tensor | Sequence[int],
    *,
    max_length: int,
    cache_length: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DAPO Eq. 13 for each response length |y|, to be added to the task reward.

    ``0`` if |y| ≤ L_max − L_cache; ``((L_max − L_cache) − |y|) / L_cache`` inside the buffer (a linear ramp
    from 0 to −1); ``−1`` beyond L_max. Truncated responses would otherwise get a reward for an answer that was
    cut off, which teaches nothing and adds noise; the ramp tells the policy that long is costly before the
    hard cut. ``cache_length=0`` gives a step: 0 up to L_max, −1 past it. Same values as TRL's
    ``trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)``, vectorised.

    The lengths are checked (a host sync, once per call): reward shaping runs outside the per-step hot path.

    Args:
        lengths: ``(n,)`` response lengths in tokens: ints, or a tensor (e.g. ``completion_mask.sum(-1)``) of
            integers or integral floats.
        max_length: L_max >= 1 (TRL ``max_completion_len``; DAPO 20480).
        cache_length: L_cache, 0 <= L_cache <= L_max (TRL ``soft_punish_cache``; DAPO 4096).
        dtype: Floating dtype of the result.

    Returns:
        ``(n,)`` penalties in [−1, 0], on ``lengths``'s device (empty for no lengths).

    Raises:
        ValueError: ``max_length`` or ``cache_length`` not an int in range (L_cache > L_max included), lengths
            not 1-d, negative, NaN/Inf or fractional, or ``dtype`` not floating.

    Example:
        >>> soft_overlong_punishment([70, 80, 90, 100, 101], max_length=100, cache_length=20)
        tensor([ 0.0000,  0.0000, -0.5000, -1.0000, -1.0000])

    References:
        Yu et al. (2025), arXiv 2503.14476, Eq. 13; TRL 1.16 ``trl/rewards/other_rewards.py``;
        verl ``workers/reward_manager/dapo.py`` (``overlong_buffer``).
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length={max_length!r}; allowed: an int >= 1 (L_max, tokens)")
    if not isinstance(cache_length, int) or isinstance(cache_length, bool) or not 0 <= cache_length <= max_length:
        raise ValueError(f"cache_length={cache_length!r}; allowed: an int in [0, max_length={max_length}] (L_cache)")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}; allowed: a floating torch dtype")
    n = _checked_lengths(lengths).to(torch.float64)
    start = max_length - cache_length
    # clamp_min(1): with L_cache = 0 the ramp branch is never selected, but must not divide by zero
    ramp = (start - n) / max(cache_length, 1)
    penalty = torch.where(n <= start, torch.zeros_like(n), torch.where(n <= max_length, ramp, -torch.ones_like(n)))
    return penalty.to(dtype)


def _checked_lengths(lengths: object) -> Tensor:
    if isinstance(lengths, Tensor):
        values = lengths
    elif isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
            raise ValueError(f"lengths={list(lengths)!r}; allowed: a sequence of ints or a 1-d tensor")
        values = torch.tensor(list(lengths), dtype=torch.int64)
    else:
        raise ValueError(f"lengths is {type(lengths).__name__}; allowed: a sequence of ints or a 1-d tensor")
    if values.dim() != 1 or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"lengths: a {values.dtype} tensor of shape {tuple(values.shape)}; allowed: 1-d integers")
    if values.is_floating_point():
        bad = ~torch.isfinite(values) | (values != values.round())
        if bool(bad.any()):
            raise ValueError(f"lengths contains {values[bad][0].item()!r}; allowed: whole numbers of tokens")
    if values.numel() and bool((values < 0).any()):
        raise ValueError(f"lengths contains {values.min().item()!r}; allowed: lengths >= 0")
    return values
