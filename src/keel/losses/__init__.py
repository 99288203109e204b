"""Stabilizing losses, one per file: z-loss, StableMax cross-entropy, the pseudo-Huber distance, and for preference
and RL fine-tuning DPO with the SFT-on-chosen anchor, the DAPO/GRPO clipped surrogate, group advantages, k3 KL,
overlong shaping and ensemble reward objectives; for mixture-of-experts routers the ST-MoE router z-loss and the
Switch load-balancing loss."""

from keel.losses.group_advantages import TRL_ADVANTAGE_EPS, group_advantages, informative_groups
from keel.losses.kl_penalty import VERL_KL_CLAMP, VERL_LOG_RATIO_CLAMP, k3_kl
from keel.losses.overlong import DAPO_CACHE_LENGTH, DAPO_MAX_LENGTH, soft_overlong_punishment
from keel.losses.policy_gradient import DAPO_EPS_HIGH, DAPO_EPS_LOW, PolicyLoss, clipped_policy_loss
from keel.losses.preference import DPOLoss, chosen_sft_loss, dpo_loss
from keel.losses.pseudo_huber import pseudo_huber, pseudo_huber_c
from keel.losses.reward_ensemble import COSTE_PPO_UWO_LAMBDA, ENSEMBLE_OBJECTIVES, ensemble_reward
from keel.losses.router import (
    LOAD_BALANCING_COEFFICIENT,
    ROUTER_Z_LOSS_COEFFICIENT,
    load_balancing_loss,
    router_z_loss,
    tokens_per_expert,
)
from keel.losses.stablemax_cross_entropy import (
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)
from keel.losses.teacher_intervention import teacher_intervention_loss
from keel.losses.z_loss import log_partition, masked_log_partition, z_loss, z_loss_from_log_z

__all__ = [
    "COSTE_PPO_UWO_LAMBDA",
    "DAPO_CACHE_LENGTH",
    "DAPO_EPS_HIGH",
    "DAPO_EPS_LOW",
    "DAPO_MAX_LENGTH",
    "ENSEMBLE_OBJECTIVES",
    "LOAD_BALANCING_COEFFICIENT",
    "ROUTER_Z_LOSS_COEFFICIENT",
    "TRL_ADVANTAGE_EPS",
    "VERL_KL_CLAMP",
    "VERL_LOG_RATIO_CLAMP",
    "chosen_sft_loss",
    "clipped_policy_loss",
    "dpo_loss",
    "DPOLoss",
    "ensemble_reward",
    "group_advantages",
    "informative_groups",
    "k3_kl",
    "load_balancing_loss",
    "log_partition",
    "log_stablemax",
    "masked_log_partition",
    "PolicyLoss",
    "pseudo_huber",
    "pseudo_huber_c",
    "router_z_loss",
    "soft_overlong_punishment",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "teacher_intervention_loss",
    "tokens_per_expert",
    "z_loss",
    "z_loss_from_log_z",
]
