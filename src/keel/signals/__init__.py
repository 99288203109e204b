"""Measure: pure tensor statistics and the probes that emit them as named on-device values.

Nothing here mutates training state.
"""

from keel.signals import grad_norm, loss, param_norm, update_ratio  # noqa: F401  (register built-ins)
from keel.signals import (  # noqa: F401  (register built-ins)
    activation_rms, adam_eps, attn_entropy, attn_logits, grad_weight_cos, output_logits, sharpness,
)
from keel.signals._hooks import quiet
from keel.signals.norms import global_norm, per_tensor_norms, update_ratios
from keel.signals.pack import Packed, pack, unpack
from keel.signals.probe import Measurements, PerParam, Probe, StepContext
from keel.signals.registry import DEFAULT_PROBES, FULL_PROBES, PROBES, create_probe, list_probes

__all__ = [
    "DEFAULT_PROBES",
    "FULL_PROBES",
    "Measurements",
    "PROBES",
    "Packed",
    "PerParam",
    "Probe",
    "StepContext",
    "create_probe",
    "global_norm",
    "list_probes",
    "pack",
    "per_tensor_norms",
    "quiet",
    "unpack",
    "update_ratios",
]
