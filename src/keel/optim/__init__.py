"""Stabilizing optimizers in the torch.optim idiom, and AdaClip and ALLoRA as gradient
transforms for any optimizer.

One optimizer per file; the registry name of each is its file's stem (`list_optimizers`).
"""

from keel.optim._registry import create_optimizer, list_optimizers
from keel.optim.ada_clip import AdaClip
from keel.optim.allora import ALLoRA, NoLoRAFoundWarning, allora_coefficients, apply_allora
from keel.optim.cga import ConfidenceGuidedAnnealing
from keel.optim.independent_adamw import IndependentAdamW
from keel.optim.orthograd import OrthoGrad, orthogonalize_
from keel.optim.spam import SPAM
from keel.optim.stable_spam import StableSPAM

__all__ = [
    "ALLoRA",
    "SPAM",
    "AdaClip",
    "ConfidenceGuidedAnnealing",
    "IndependentAdamW",
    "NoLoRAFoundWarning",
    "OrthoGrad",
    "StableSPAM",
    "allora_coefficients",
    "apply_allora",
    "create_optimizer",
    "list_optimizers",
    "orthogonalize_",
]
