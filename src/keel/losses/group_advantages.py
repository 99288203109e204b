"""Group-relative advantages (GRPO) and DAPO's dynamic-sampling filter over groups of responses to one prompt.

From Shao et al. (2024), "DeepSeekMath" (GRPO, arXiv 2402.03300, §4.1.2) and Yu et al. (2025), DAPO
(arXiv 2503.14476, Eq. 11: keep a prompt only if 0 < #correct < G).
"""

from __future__ import annotations

from torch import Tensor

from keel.losses._checks import check_floating, check_nonempty, check_number, compute_dtype

TRL_ADVANTAGE_EPS = 1e-4  # GRPOTrainer: (r − mean) / (std + 1e-4)


def _groups(rewards: object, group_size: object) -> Tensor:
    """``rewards`` viewed as ``(groups, group_size)``, after checking both arguments."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size={group_size!r}; allowed: an int >= 2 (responses per prompt)")
    check_floating("rewards", rewards, dim=1)
    assert isinstance(rewards, Tensor)
    check_nonempty("rewards", rewards)
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards.shape={tuple(rewards.shape)}; allowed: a length divisible by group_size={group_size}"
        )
    return rewards.view(-1, group_size)  # (groups, group_size): each prompt's responses are adjacent, as in TRL


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = TRL_ADVANTAGE_EPS) -> Tensor:
    """GRPO's advantage of each response: ``(r − mean of its group) / (std of its group + eps)``.

    The std is the unbiased (N − 1) one, as TRL's ``GRPOTrainer`` computes it (``scale_rewards="group"``).
    A group whose rewards are all equal gets advantage 0 for every response: it carries no learning signal
    (see `informative_groups`).

    Half precision is computed in float32; NaN/±Inf propagate into their group.

    Args:
        rewards: ``(groups · group_size,)`` one reward per response, each prompt's ``group_size`` responses
            adjacent (TRL's layout).
        group_size: Responses per prompt G >= 2 (TRL ``num_generations``; DAPO 16).
        eps: Added to the std, a finite number >= 0 (TRL: 1e-4).

    Returns:
        ``(groups · group_size,)`` advantages, float32 (float64 for float64 rewards).

    Raises:
        ValueError: rewards not a 1-d floating tensor, empty, or of a length not divisible by ``group_size``;
            ``group_size`` < 2; ``eps`` negative or not finite.

    Example:
        >>> import torch
        >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)
        tensor([ 1.1545, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])

    References:
        Shao et al. (2024), arXiv 2402.03300, §4.1.2; TRL 1.16 ``GRPOTrainer._generate_and_score_completions``.
    """
    eps = check_number("eps", eps, low=0.0)
    grouped = _groups(rewards, group_size)
    grouped = grouped.to(compute_dtype(grouped))
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic-sampling filter: True for each group whose rewards are not all equal.

    A group where every response got the same reward (all correct or all wrong) has zero advantage and adds
    nothing but noise to the batch. DAPO drops such groups and samples more prompts (verl ``filter_groups``:
    keep when the std is > 0); TRL has no equivalent and logs their share as ``frac_reward_zero_std``. The
    fraction of False here is keel's ``RL_ZERO_STD_GROUPS`` signal. Equality is exact, as verl's std > 0.

    Args:
        rewards: ``(groups · group_size,)`` rewards, each prompt's responses adjacent.
        group_size: Responses per prompt, >= 2.

    Returns:
        ``(groups,)`` bool. A group containing NaN is not informative (its rewards are unusable).

    Raises:
        ValueError: as `group_advantages`.

    Example:
        >>> import torch
        >>> keep = informative_groups(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
        >>> keep, 1 - keep.float().mean()  # the zero-std-groups fraction
        (tensor([ True, False]), tensor(0.5000))

    References:
        Yu et al. (2025), DAPO, arXiv 2503.14476, Eq. 11 and §3.2; verl ``recipe/dapo`` ``filter_groups``.
    """
    grouped = _groups(rewards, group_size)
    spread = grouped.amax(dim=1) - grouped.amin(dim=1)
    return spread > 0  # NaN > 0 is False
