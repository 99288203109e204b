"""Conservative rewards from a reward-model ensemble: mean, worst-case (WCO), uncertainty-weighted (UWO), robust mix.

From Coste et al. (2024), "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024, arXiv 2310.02743),
and Yan et al. (2024), "Reward-Robust RLHF in LLMs" (arXiv 2409.15360).
"""

from __future__ import annotations

from torch import Tensor

from keel.losses._checks import check_floating, check_nonempty, check_number, check_shape, compute_dtype

ENSEMBLE_OBJECTIVES = ("mean", "wco", "uwo", "robust")
COSTE_PPO_UWO_LAMBDA = 0.1  # tlc4418/llm_optimization configs/config_rl.yaml (the best-of-n path uses 0.5)
DEFAULT_NOMINAL_WEIGHT = 0.5


def ensemble_reward(
    rewards: Tensor,
    objective: str = "mean",
    *,
    uwo_lambda: float = COSTE_PPO_UWO_LAMBDA,
    unbiased: bool = True,
    nominal_weight: float = DEFAULT_NOMINAL_WEIGHT,
    member_std: Tensor | None = None,
) -> Tensor:
    """One reward per sample from the ``(members, batch)`` rewards of an ensemble.

    Objectives:

    - ``"mean"``: the members' mean. Over-optimisable like a single model, only less noisy.
    - ``"wco"``: worst case, the minimum over members (Coste et al.).
    - ``"uwo"``: uncertainty-weighted, ``mean − λ·Var`` over members (Coste et al.). keel follows their PPO
      path: the unbiased (N − 1) variance and λ = 0.1 (``torch.var`` and ``configs/config_rl.yaml`` in
      tlc4418/llm_optimization), because these objectives feed policy-gradient loops. Their best-of-n path
      uses the population variance (``np.var``) and λ = 0.5: pass ``unbiased=False, uwo_lambda=0.5``.
    - ``"robust"``: Reward-Robust RLHF's mix ``w·nominal + (1 − w)·min`` over members, ``w = nominal_weight``
      (the paper's λ). The nominal reward is the members' mean; with ``member_std`` (Bayesian heads that
      predict a std, the paper's BRME) it is, per sample, the reward of the member with the lowest predicted
      std, as we read the paper (no official code found). w = 1 is the nominal reward alone; w = 0 is WCO.

    Members are not rescaled: normalise each on a reference set first (Coste et al. trained theirs
    identically). NaN or ±Inf rewards propagate into their sample's result (min and var propagate NaN); they
    are not refused here because checking would sync the device.

    Args:
        rewards: ``(members, batch)`` floating rewards, members >= 1 (>= 2 for unbiased ``"uwo"``).
        objective: One of ``"mean"``, ``"wco"``, ``"uwo"``, ``"robust"``.
        uwo_lambda: λ >= 0 for ``"uwo"``.
        unbiased: ``"uwo"``'s variance: N − 1 (True) or N (False).
        nominal_weight: w in [0, 1] for ``"robust"``.
        member_std: Optional ``(members, batch)`` predicted std per member, for ``"robust"`` only.

    Returns:
        ``(batch,)`` rewards; half precision is computed in float32, float64 stays float64.

    Raises:
        ValueError: an unknown objective, rewards not a non-empty 2-d floating tensor, unbiased ``"uwo"`` with
            one member, λ or w out of range, or ``member_std`` of another shape or with another objective.

    Example:
        >>> import torch
        >>> r = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])  # 3 members, 2 samples
        >>> ensemble_reward(r, "mean"), ensemble_reward(r, "wco")
        (tensor([2., 1.]), tensor([1., 0.]))
        >>> ensemble_reward(r, "uwo")  # mean − 0.1·var (N − 1): var = 1 and 3
        tensor([1.9000, 0.7000])
        >>> ensemble_reward(r, "robust", nominal_weight=0.5)  # (mean + min) / 2
        tensor([1.5000, 0.5000])

    References:
        Coste et al. (2024), arXiv 2310.02743, §3; tlc4418/llm_optimization
        ``src/reward_modeling/scoring/ppo_reward_functions.py`` and ``src/bon/ensemble_rm.py``.
        Yan et al. (2024), "Reward-Robust RLHF in LLMs", arXiv 2409.15360 (objective λ·nominal + (1 − λ)·min).
    """
    if objective not in ENSEMBLE_OBJECTIVES:
        raise ValueError(f"objective={objective!r}; allowed: one of {ENSEMBLE_OBJECTIVES}")
    uwo_lambda = check_number("uwo_lambda", uwo_lambda, low=0.0)
    nominal_weight = check_number("nominal_weight", nominal_weight, low=0.0, high=1.0)
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased={unbiased!r}; allowed: True (N − 1, Coste et al.'s PPO) or False (N)")
    check_floating("rewards", rewards, dim=2)
    check_nonempty("rewards", rewards)
    if objective == "uwo" and unbiased and rewards.shape[0] < 2:
        raise ValueError(
            f"rewards.shape={tuple(rewards.shape)}: 1 member; allowed for objective='uwo' with unbiased=True: "
            "at least 2 members (or unbiased=False)"
        )
    if member_std is not None:
        if objective != "robust":
            raise ValueError(f"member_std given with objective={objective!r}; allowed: only with 'robust'")
        check_floating("member_std", member_std)
        check_shape("member_std", member_std, "rewards", rewards)

    values = rewards.to(compute_dtype(rewards))
    mean = values.mean(dim=0)
    if objective == "mean":
        return mean
    worst = values.amin(dim=0)  # amin propagates NaN; min(dim=) also returns indices we do not need
    if objective == "wco":
        return worst
    if objective == "uwo":
        return mean - uwo_lambda * values.var(dim=0, correction=1 if unbiased else 0)
    nominal = mean
    if member_std is not None:
        most_confident = member_std.argmin(dim=0, keepdim=True)  # (1, batch): the member with the lowest std
        nominal = values.gather(0, most_confident).squeeze(0)
    return nominal_weight * nominal + (1.0 - nominal_weight) * worst
