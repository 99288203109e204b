"""The probe registry: built-in probes by name (the name equals the file stem)."""

from __future__ import annotations

from keel._core.registry import Registry
from keel.signals.probe import Probe

PROBES: Registry[Probe] = Registry("probe")

# The cheap transformer signals ride along by default: the max attention logit (a max over logits the model
# already has), output-logit statistics and block-output RMS (reductions inside forward hooks), attention
# entropy every 10 steps. `keel bench overhead` keeps their cost in check (BENCHMARKS.md).
DEFAULT_PROBES: tuple[str, ...] = ("loss", "grad_norm", "param_norm", "attn_logits", "attn_entropy",
                                   "output_logits", "activation_rms")
FULL_PROBES: tuple[str, ...] = (*DEFAULT_PROBES, "update_ratio", "grad_weight_cos", "adam_eps")


def create_probe(name: str, **kwargs: object) -> Probe:
    """Build a registered probe by name, e.g. ``create_probe("grad_norm")``."""
    return PROBES.create(name, **kwargs)


def list_probes() -> list[str]:
    return PROBES.names()
