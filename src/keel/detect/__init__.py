"""Decide: signal history → findings (kind, step, severity, evidence, cause, advice). Never acts."""

from keel._core import keys
from keel.detect.activation_growth import ActivationGrowthConfig, ActivationGrowthDetector
from keel.detect.attention_entropy_collapse import AttentionEntropyCollapseDetector, EntropyCollapseConfig
from keel.detect.attention_logit_growth import AttentionLogitGrowthDetector
from keel.detect.causes import CAUSES, Advice, Cause, cause_for
from keel.detect.clip_saturation import ClipSaturationConfig, ClipSaturationDetector
from keel.detect.dead_groups import DeadGroupsConfig, DeadGroupsDetector
from keel.detect.detector import DETECTORS, Detector, create_detector, list_detectors
from keel.detect.diagnosis import Diagnosis, diagnose, format_diagnoses
from keel.detect.divergence import DivergenceConfig, DivergenceDetector
from keel.detect.edge_of_stability import EdgeOfStabilityConfig, EdgeOfStabilityDetector
from keel.detect.eps_dominance import EpsDominanceConfig, EpsDominanceDetector
from keel.detect.growth import GrowthConfig, GrowthDetector
from keel.detect.kl_blowup import KLBlowupConfig, KLBlowupDetector
from keel.detect.lead_time import degradation_step, lead_steps
from keel.detect.length_explosion import LengthExplosionConfig, LengthExplosionDetector
from keel.detect.likelihood_displacement import LikelihoodDisplacementConfig, LikelihoodDisplacementDetector
from keel.detect.lora_blowup import LoraBlowupConfig, LoraBlowupDetector
from keel.detect.loss_scale_thrash import LossScaleThrashConfig, LossScaleThrashDetector
from keel.detect.lr_surge import LrSurgeConfig, LrSurgeDetector
from keel.detect.non_finite import NonFiniteConfig, NonFiniteDetector
from keel.detect.non_finite_origin import NonFiniteOriginDetector
from keel.detect.norm_stats_jump import NormStatsJumpConfig, NormStatsJumpDetector
from keel.detect.opposing_signals import OpposingSignalsDetector, OpposingSignalsDetectorConfig
from keel.detect.output_logit_drift import OutputLogitDriftConfig, OutputLogitDriftDetector
from keel.detect.policy_entropy_collapse import PolicyEntropyCollapseConfig, PolicyEntropyCollapseDetector
from keel.detect.presets import moe_detectors, policy_detectors, preference_detectors
from keel.detect.qat_oscillation import QatOscillationConfig, QatOscillationDetector
from keel.detect.reward_overoptimization import RewardOverOptimizationConfig, RewardOverOptimizationDetector
from keel.detect.robust import robust_location_scale, robust_z
from keel.detect.softmax_collapse import SoftmaxCollapseConfig, SoftmaxCollapseDetector
from keel.detect.source_drift import SourceDriftConfig, SourceDriftDetector
from keel.detect.spike import SpikeConfig, SpikeDetector
from keel.detect.stability_gap import StabilityGapConfig, StabilityGapDetector
from keel.detect.trend import TrendWindow, theil_sen_slope

__all__ = [
    "ActivationGrowthConfig",
    "ActivationGrowthDetector",
    "Advice",
    "AttentionEntropyCollapseDetector",
    "AttentionLogitGrowthDetector",
    "CAUSES",
    "Cause",
    "ClipSaturationConfig",
    "ClipSaturationDetector",
    "DETECTORS",
    "DeadGroupsConfig",
    "DeadGroupsDetector",
    "Detector",
    "Diagnosis",
    "DivergenceConfig",
    "DivergenceDetector",
    "EdgeOfStabilityConfig",
    "EdgeOfStabilityDetector",
    "EpsDominanceConfig",
    "EpsDominanceDetector",
    "EntropyCollapseConfig",
    "GrowthConfig",
    "GrowthDetector",
    "KLBlowupConfig",
    "KLBlowupDetector",
    "LengthExplosionConfig",
    "LengthExplosionDetector",
    "LikelihoodDisplacementConfig",
    "LikelihoodDisplacementDetector",
    "LoraBlowupConfig",
    "LoraBlowupDetector",
    "LossScaleThrashConfig",
    "LossScaleThrashDetector",
    "LrSurgeConfig",
    "LrSurgeDetector",
    "NonFiniteConfig",
    "NonFiniteDetector",
    "NonFiniteOriginDetector",
    "NormStatsJumpConfig",
    "NormStatsJumpDetector",
    "OpposingSignalsDetector",
    "OpposingSignalsDetectorConfig",
    "OutputLogitDriftConfig",
    "OutputLogitDriftDetector",
    "PolicyEntropyCollapseConfig",
    "PolicyEntropyCollapseDetector",
    "QatOscillationConfig",
    "QatOscillationDetector",
    "RewardOverOptimizationConfig",
    "RewardOverOptimizationDetector",
    "SoftmaxCollapseConfig",
    "SoftmaxCollapseDetector",
    "SourceDriftConfig",
    "SourceDriftDetector",
    "StabilityGapConfig",
    "StabilityGapDetector",
    "SpikeConfig",
    "SpikeDetector",
    "TrendWindow",
    "cause_for",
    "create_detector",
    "default_detectors",
    "degradation_step",
    "diagnose",
    "format_diagnoses",
    "lead_steps",
    "list_detectors",
    "moe_detectors",
    "policy_detectors",
    "preference_detectors",
    "robust_location_scale",
    "robust_z",
    "theil_sen_slope",
]


def default_detectors() -> list[Detector]:
    """The detectors a `Guard` runs unless told otherwise.

    Loss and gradient spikes, divergence, non-finite values and where they were born, a GradScaler's loss-scale
    thrash, an update whose learning rate surges far above any the run had used (`LrSurgeDetector`); and the
    predictive
    ones: attention-logit growth, attention-entropy collapse, output-logit drift, softmax collapse, the
    edge of stability and activation growth towards the precision's max; a LoRA adapter's blow-up; the stability
    gap after a phase switch (`Guard.phase`, evals); a mixture-of-experts router's logit growth, load collapse and
    dead experts (`moe_detectors`).
    Two read opt-in probes: Adam's ε-dominance the ``adam_eps`` probe (in ``probes="full"``), quantization-aware
    training's weight oscillation the ``weight_oscillation`` probe. Each stays silent while its signal is absent
    (e.g. no sharpness probe, no attention, no LoRA adapter, no phase, no router probe, no activation probe).
    """
    return [
        SpikeDetector(signal="loss"),
        SpikeDetector(signal=keys.GRAD_NORM),
        DivergenceDetector(),
        NonFiniteDetector(),
        NonFiniteOriginDetector(),
        LossScaleThrashDetector(),
        LrSurgeDetector(),
        NormStatsJumpDetector(),
        AttentionLogitGrowthDetector(),
        AttentionEntropyCollapseDetector(),
        OutputLogitDriftDetector(),
        SoftmaxCollapseDetector(),
        EdgeOfStabilityDetector(),
        EpsDominanceDetector(),
        ActivationGrowthDetector(),
        LoraBlowupDetector(),
        StabilityGapDetector(),
        QatOscillationDetector(),
        *moe_detectors(),
    ]
