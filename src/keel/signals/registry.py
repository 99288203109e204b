"""The probe registry: built-in probes by name (the name equals the file stem)."""

from __future__ import annotations

from keel._core.registry import Registry
from keel.signals.probe import Probe

PROBES: Registry[Probe] = Registry("probe")

# The default set stays within the foundation's step-time budget on any model. The transformer signals —
# max attention logit, attention entropy every 10 steps, output-logit statistics, block-output RMS — are
# reductions inside forward hooks; on the small CPU proxy they cost ~17 % of a step (process-CPU-time ratio,
# BENCHMARKS.md), so they are one word away (`probes="transformer"`) rather than always on. The proxy
# trainer, the demo and the scenario zoo use them.
# The LoRA probe finds no adapter in a model without one and then measures nothing; so does the router probe
# without an MoE router (on the small MoE proxy it costs ~2 % of a step: BENCHMARKS.md, docs/moe.md).
# The normalization-statistics probe finds no BatchNorm in most transformers and measures nothing; on a CNN with
# BatchNorm it costs one fused norm over the running variances (a CIFAR-style CNN: step-time ratio 1.002, in the noise).
DEFAULT_PROBES: tuple[str, ...] = ("loss", "grad_norm", "param_norm", "lora", "router", "norm_stats")
TRANSFORMER_PROBES: tuple[str, ...] = (
    *DEFAULT_PROBES,
    "attn_logits",
    "attn_entropy",
    "output_logits",
    "activation_rms",
)
FULL_PROBES: tuple[str, ...] = (*TRANSFORMER_PROBES, "update_ratio", "grad_weight_cos", "adam_eps")


def create_probe(name: str, **kwargs: object) -> Probe:
    """Build a registered probe by name, e.g. ``create_probe("grad_norm")``."""
    return PROBES.create(name, **kwargs)


def list_probes() -> list[str]:
    return PROBES.names()
