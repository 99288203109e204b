"""Stabilizing losses: z-loss, StableMax cross-entropy and the pseudo-Huber distance. One loss per file."""

from keel.losses.group_advantages import TRL_ADVANTAGE_EPS, group_advantages, informative_groups
from keel.losses.kl_penalty import VERL_KL_CLAMP, VERL_LOG_RATIO_CLAMP, k3_kl
from keel.losses.overlong import DAPO_CACHE_LENGTH, DAPO_MAX_LENGTH, soft_overlong_punishment
from keel.losses.policy_gradient import DAPO_EPS_HIGH, DAPO_EPS_LOW, PolicyLoss, clipped_policy_loss
from keel.losses.preference import DPOLoss, chosen_sft_loss, dpo_loss
from keel.losses.pseudo_huber import pseudo_huber, pseudo_huber_c
from keel.losses.stablemax_cross_entropy import (
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
)
from keel.losses.z_loss import log_partition, z_loss, z_loss_from_log_z

__all__ = [
    "DAPO_CACHE_LENGTH",
    "DAPO_MAX_LENGTH",
    "soft_overlong_punishment",
    "DAPO_EPS_HIGH",
    "DAPO_EPS_LOW",
    "PolicyLoss",
    "TRL_ADVANTAGE_EPS",
    "VERL_KL_CLAMP",
    "VERL_LOG_RATIO_CLAMP",
    "clipped_policy_loss",
    "group_advantages",
    "informative_groups",
    "k3_kl",
    "DPOLoss",
    "chosen_sft_loss",
    "dpo_loss",
    "log_partition",
    "log_stablemax",
    "pseudo_huber",
    "pseudo_huber_c",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_s",
    "z_loss",
    "z_loss_from_log_z",
]
