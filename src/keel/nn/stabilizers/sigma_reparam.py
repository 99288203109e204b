"""Stabilizer ``sigma_reparam``: σReparam on every dense weight, as a parametrization of the weight.

From Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
(arXiv 2303.06296).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn
from torch.nn.utils import parametrize

from keel._core import KeelWarning
from keel.nn._surgery import adapter_factors, linear_features, shared_parameter_ids
from keel.nn.sigma_reparam import SigmaReparam
from keel.nn.stabilizers._base import Change, stabilizers


@stabilizers.register("sigma_reparam")
@dataclass(kw_only=True)
class SigmaReparamStabilizer:
    """Reparametrise W as (γ/σ(W))·W in every ``nn.Linear``, HF ``Conv1D`` and ``nn.MultiheadAttention``.

    Applied with ``torch.nn.utils.parametrize`` on the weight itself, so the module, its hooks and its
    Parameter objects stay (optimizer state survives) and every reader of ``.weight`` sees Ŵ —
    including ``nn.MultiheadAttention``, which reads ``in_proj_weight`` and ``out_proj.weight`` directly.
    The official ``convert_to_sn`` swaps ``nn.Linear`` modules instead, which in torchvision's ViT leaves
    both attention projections un-reparametrised. γ starts at σ(W), so outputs are unchanged at conversion.
    State-dict keys move to ``<module>.parametrizations.weight.original`` (+ ``.0.u``, ``.0.sigma``,
    ``.0.gamma``).

    Weights shared with another module (a tied LM head) are left alone: reparametrising one use of a
    tied matrix would silently change the other. So are frozen weights (``requires_grad=False``, e.g. the base
    of a LoRA fine-tune), whose spectral norm cannot grow and which a trainable γ would partly unfreeze, and
    the factors of a peft adapter (``lora_A``/``lora_B``): B starts at zero, and σReparam is defined on a weight,
    not on the factors of its update. A weight with a dimension of size 0 has no spectral norm: it is left out,
    with one KeelWarning naming the modules.

    Attributes:
        stats_only: Track σ without reparametrising (a spectral-norm monitor).
        exclude: fnmatch patterns of qualified module names to leave alone, e.g. ``("lm_head",)``.
    """

    name: ClassVar[str] = "sigma_reparam"
    description: ClassVar[str] = "W -> (gamma/sigma(W))·W on every dense weight; prevents attention-entropy collapse"
    reference: ClassVar[str] = "Zhai et al. 2023 (arXiv 2303.06296); code apple/ml-sigma-reparam"
    order: ClassVar[int] = 20

    stats_only: bool = False
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.stats_only, bool):
            raise ValueError(f"SigmaReparamStabilizer.stats_only={self.stats_only!r}; allowed: True or False")
        if not isinstance(self.exclude, (tuple, list)) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"SigmaReparamStabilizer.exclude={self.exclude!r}; allowed: a tuple of fnmatch patterns")
        self.exclude = tuple(self.exclude)

    def apply(self, model: nn.Module) -> list[Change]:
        shared = shared_parameter_ids(model)
        factors = adapter_factors(model)
        changes, empty = [], []
        for name, module in list(model.named_modules()):
            if id(module) in factors or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                continue
            for tensor_name in self._targets(module):
                if parametrize.is_parametrized(module, tensor_name):
                    continue
                weight = getattr(module, tensor_name, None)
                if not isinstance(weight, nn.Parameter) or id(weight) in shared or weight.dim() < 2:
                    continue
                if not weight.requires_grad:  # frozen (a LoRA base): it cannot grow, and a γ would unfreeze it
                    continue
                if weight.numel() == 0:  # a zero-size layer: an empty matrix has no σ (SigmaReparam refuses it)
                    empty.append(name)
                    continue
                reparam = SigmaReparam(weight, stats_only=self.stats_only)
                reparam.train(module.training)
                parametrize.register_parametrization(module, tensor_name, reparam)
                changes.append(
                    Change(
                        stabilizer=self.name,
                        name=name,
                        old=module,
                        new=module,
                        anchor=weight,
                        how=f"{tensor_name} parametrized by SigmaReparam",
                        new_parameters=tuple(reparam.parameters()),
                    )
                )
        if empty:
            warnings.warn(
                f"sigma_reparam: left out {len(empty)} weights of size 0 ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}): an empty matrix has no spectral norm",
                KeelWarning,
                stacklevel=3,
            )
        return changes

    @staticmethod
    def _targets(module: nn.Module) -> tuple[str, ...]:
        if isinstance(module, nn.MultiheadAttention):
            if module._qkv_same_embed_dim:
                return ("in_proj_weight",)
            return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return ("weight",) if linear_features(module) is not None else ()
