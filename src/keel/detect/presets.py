"""Detector presets for domains: what to add to `default_detectors` for preference and RL training, and the MoE set.

A preference or RL loop measures its own signals (`keel.signals.preference_signals`, `policy_signals`,
`reward_ensemble_signals`) and hands them to ``guard.step(loss, signals=...)``; these detectors read them. Each stays
silent while its keys are absent, so a preset never needs to know the trainer's configuration: a GRPO run with
β = 0 logs no KL and the KL detector says nothing; one with ``num_iterations=1`` clips nothing and that is normal.

Example:
    >>> from keel.detect import default_detectors
    >>> detectors = [*default_detectors(), *policy_detectors()]  # keel.Guard(model, optimizer, detectors=detectors)
    >>> [d.name for d in policy_detectors()]
    ['policy_entropy_collapse', 'kl_blowup', 'reward_overoptimization', 'length_explosion', 'clip_saturation', \
'dead_groups']
"""

from __future__ import annotations

from keel.detect.clip_saturation import ClipSaturationDetector
from keel.detect.dead_experts import DeadExpertsDetector
from keel.detect.dead_groups import DeadGroupsDetector
from keel.detect.detector import Detector
from keel.detect.kl_blowup import KLBlowupDetector
from keel.detect.length_explosion import LengthExplosionDetector
from keel.detect.likelihood_displacement import LikelihoodDisplacementDetector
from keel.detect.load_collapse import LoadCollapseDetector
from keel.detect.policy_entropy_collapse import PolicyEntropyCollapseDetector
from keel.detect.reward_overoptimization import RewardOverOptimizationDetector
from keel.detect.router_logit_growth import RouterLogitGrowthDetector


def preference_detectors() -> list[Detector]:
    """Detectors for DPO and its kin: likelihood displacement (the chosen response's log-probability falling while
    the margin rises).

    Use: ``keel.Guard(model, optimizer, detectors=[*default_detectors(), *preference_detectors()])``, and pass
    ``signals=keel.signals.preference_signals(...)`` to each ``guard.step``.
    """
    return [LikelihoodDisplacementDetector()]


def policy_detectors() -> list[Detector]:
    """Detectors for GRPO, PPO and RLOO: policy-entropy collapse, KL blow-up, reward over-optimisation, length
    explosion, clip saturation and dead groups (truncation starvation).

    Use: ``keel.Guard(model, optimizer, detectors=[*default_detectors(), *policy_detectors()])``, and pass
    ``signals={**keel.signals.policy_signals(...), **keel.signals.reward_ensemble_signals(...)}`` to each
    ``guard.step``.
    """
    return [
        PolicyEntropyCollapseDetector(),
        KLBlowupDetector(),
        RewardOverOptimizationDetector(),
        LengthExplosionDetector(),
        ClipSaturationDetector(),
        DeadGroupsDetector(),
    ]


def moe_detectors() -> list[Detector]:
    """Detectors for mixture-of-experts routers: router-logit growth, load collapse (with the gate entropy's
    lock-in), dead experts. They read the router probe's keys (`keel.signals.RouterProbe`, ``moe/*``).

    Part of `default_detectors`: each is one dictionary look-up per step while no ``moe/*`` key is logged.
    """
    return [RouterLogitGrowthDetector(), LoadCollapseDetector(), DeadExpertsDetector()]
