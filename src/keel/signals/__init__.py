"""Measure: pure tensor statistics and the probes that emit them as named on-device values.

Nothing here mutates training state.
"""

from keel.signals import (  # noqa: F401  (register built-ins)
    activation_rms,
    adam_eps,
    attn_entropy,
    attn_logits,
    grad_norm,
    grad_weight_cos,
    lora,
    loss,
    norm_stats,
    numerics,
    opposing_signals,
    output_logits,
    param_norm,
    router,
    sharpness,
    update_ratio,
    weight_oscillation,
)
from keel.signals._attention_tap_probe import NoAttentionFoundWarning
from keel.signals._hooks import quiet
from keel.signals.activation_rms import ActivationRmsConfig, ActivationRmsProbe, activation_stats
from keel.signals.adam_eps import AdamEpsConfig, AdamEpsProbe, adam_update_stats
from keel.signals.attention_stats import attention_entropy, attention_max_logit, sdpa_logits
from keel.signals.attn_entropy import AttnEntropyConfig, AttnEntropyProbe
from keel.signals.attn_logits import AttnLogitsConfig, AttnLogitsProbe
from keel.signals.grad_weight_cos import GradWeightCosConfig, GradWeightCosProbe, grad_weight_cosines
from keel.signals.logit_stats import log_partition, softmax_collapse_fraction, zero_loss_fraction
from keel.signals.lora import LoraProbe, LoraProbeConfig, find_adapters, lora_norms
from keel.signals.norm_stats import NormStatsProbe, tracking_norm_layers
from keel.signals.norms import global_norm, per_tensor_norms, update_ratios
from keel.signals.numerics import NumericsConfig, NumericsProbe, numerics_stats
from keel.signals.opposing_signals import OpposingSignalsConfig, OpposingSignalsProbe, opposing_groups, opposing_stats
from keel.signals.output_logits import OutputLogitsConfig, OutputLogitsProbe
from keel.signals.pack import HostCopy, Packed, pack, unpack
from keel.signals.policy import policy_signals, reward_ensemble_signals
from keel.signals.preference import preference_signals
from keel.signals.probe import Measurements, PerParam, Probe, StepContext
from keel.signals.registry import (
    DEFAULT_PROBES,
    FULL_PROBES,
    PROBES,
    TRANSFORMER_PROBES,
    create_probe,
    list_probes,
)
from keel.signals.router import RouterProbe, RouterProbeConfig, find_routers, router_signals, router_sums
from keel.signals.sharpness import SharpnessConfig, SharpnessProbe, hutchinson_trace, top_eigenvalue
from keel.signals.source_gradients import SourceGradientsConfig, SourceGradientsProbe, source_losses
from keel.signals.weight_oscillation import WeightOscillationConfig, WeightOscillationProbe, find_quantized_layers

__all__ = [
    "ActivationRmsConfig",
    "ActivationRmsProbe",
    "AdamEpsConfig",
    "AdamEpsProbe",
    "AttnEntropyConfig",
    "AttnEntropyProbe",
    "AttnLogitsConfig",
    "AttnLogitsProbe",
    "DEFAULT_PROBES",
    "FULL_PROBES",
    "TRANSFORMER_PROBES",
    "GradWeightCosConfig",
    "GradWeightCosProbe",
    "Measurements",
    "NoAttentionFoundWarning",
    "NormStatsProbe",
    "NumericsConfig",
    "NumericsProbe",
    "OpposingSignalsConfig",
    "OpposingSignalsProbe",
    "OutputLogitsConfig",
    "OutputLogitsProbe",
    "PROBES",
    "Packed",
    "PerParam",
    "Probe",
    "RouterProbe",
    "RouterProbeConfig",
    "SharpnessConfig",
    "SharpnessProbe",
    "SourceGradientsConfig",
    "SourceGradientsProbe",
    "WeightOscillationConfig",
    "WeightOscillationProbe",
    "source_losses",
    "StepContext",
    "activation_stats",
    "adam_update_stats",
    "attention_entropy",
    "attention_max_logit",
    "create_probe",
    "global_norm",
    "find_routers",
    "find_quantized_layers",
    "grad_weight_cosines",
    "hutchinson_trace",
    "list_probes",
    "log_partition",
    "numerics_stats",
    "opposing_groups",
    "opposing_stats",
    "HostCopy",
    "LoraProbe",
    "LoraProbeConfig",
    "find_adapters",
    "lora_norms",
    "pack",
    "per_tensor_norms",
    "policy_signals",
    "preference_signals",
    "quiet",
    "reward_ensemble_signals",
    "router_signals",
    "router_sums",
    "sdpa_logits",
    "softmax_collapse_fraction",
    "top_eigenvalue",
    "tracking_norm_layers",
    "unpack",
    "update_ratios",
    "zero_loss_fraction",
]
