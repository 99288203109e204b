"""LoRA probe: how large each low-rank adapter's weight update ΔW = scaling·B·A is, and how large A and B are.

| key                         | cadence             | cost (all adapters together)                               |
|-----------------------------|---------------------|------------------------------------------------------------|
| `lora/delta_norm_max`       | every `every` steps | per group of same-shaped adapters: two stacks, two `bmm`s  |
| `lora/delta_ratio_max`      | every `every` steps | a division by the base norms, measured once (frozen base)  |
| `lora/a_norm/<module>`      | `log_every` steps   | one float per adapter (the Gram matrices' traces)          |
| `lora/b_norm/<module>`      | `log_every` steps   | one float per adapter                                      |
| `lora/delta_norm/<module>`  | `log_every` steps   | one float per adapter                                      |

An adapter is found by its layout, not by its class: a module with peft's ``lora_A`` / ``lora_B`` ``ModuleDict``s
(one entry per adapter name; ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings) and its ``scaling`` dict
(α/r, or α/√r with rsLoRA), or a module with ``lora_a`` / ``lora_b`` parameters and a float ``scaling`` (the layout
of keel's scenario adapters). The frozen base costs nothing: the probe reads the adapters' few parameters, and
each base weight's norm once (again each time only if that weight is trainable).

‖ΔW‖_F is never formed as an (out × in) matrix: with the Gram matrices G_A = A·Aᵀ and G_B = Bᵀ·B (r × r),
‖B·A‖_F² = trace(G_B·G_A) = Σᵢⱼ (G_B)ᵢⱼ(G_A)ᵢⱼ, ‖A‖_F² = trace(G_A) and ‖B‖_F² = trace(G_B): O((in + out)·r²)
per adapter instead of O(in·out·r). Adapters of the same shapes are stacked and reduced together (one ``bmm`` per
Gram matrix per group), in float32 whatever the adapters' dtype. Rounding: the trace sums terms of both signs, so
a ‖B·A‖ far below ‖A‖·‖B‖ (B's columns nearly orthogonal to A's rows) has an absolute error of about
1e-7·‖A‖²‖B‖²; it is clamped at 0. B starts at zero (Hu et al. 2021), so ΔW and ``lora/b_norm`` are 0 at step 0
and grow as the adapter learns; ``lora/delta_ratio_max`` is the largest ‖ΔW‖/‖W_base‖ over the adapters,
how far the fine-tune has moved any weight from its base. A NaN or ±Inf in A or B gives a non-finite norm.
DoRA's magnitude vector (``lora_magnitude_vector``) is not included: the ΔW here is the low-rank part.

References:
    Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685;
    peft 0.21 ``peft/tuners/lora/layer.py`` (``LoraLayer.adapter_layer_names``, ``scaling``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals.attn_logits import due
from keel.signals.norms import per_tensor_norms
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES

# peft's adapter containers: (A, B) ModuleDicts of Linear/Conv layers, and (A, B) ParameterDicts of embeddings
_PEFT_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: ΔW = scaling · B·A added to ``base`` (the frozen weight), named ``name``."""

    name: str
    module: nn.Module
    adapter: str | None  # the peft adapter name (None: a module with a float ``scaling``)
    a: Tensor  # (r, in) — a conv A's kernel is flattened to (r, in·k·k)
    b: Tensor  # (out, r)
    base: Tensor | None

    def scaling(self) -> float:
        """The current scaling: read each time, since peft can rescale adapters during training."""
        s: Any = getattr(self.module, "scaling", 1.0)  # peft: a dict by adapter name; keel-style: a float
        return float(s[self.adapter] if self.adapter is not None else s)


def _weight(m: object) -> Tensor | None:
    w = m if isinstance(m, Tensor) else getattr(m, "weight", None)
    return w if isinstance(w, Tensor) else None


def find_adapters(model: nn.Module) -> list[Adapter]:
    """The LoRA adapters of ``model`` (peft's, or modules with ``lora_a`` / ``lora_b`` parameters), in module order.

    A peft module with several adapters gives one entry per active adapter, named ``<module>/<adapter>`` unless the
    adapter is ``default``.

    Example:
        >>> find_adapters(nn.Linear(2, 2))
        []
    """
    found: list[Adapter] = []
    for path, module in model.named_modules():
        base = getattr(module, "get_base_layer", None)
        base_weight = _weight(base()) if callable(base) else _weight(getattr(module, "base", None))
        active = getattr(module, "active_adapters", None)
        for a_name, b_name in _PEFT_PAIRS:
            a_dict, b_dict = getattr(module, a_name, None), getattr(module, b_name, None)
            if not isinstance(a_dict, nn.ModuleDict | nn.ParameterDict) or not isinstance(
                b_dict, nn.ModuleDict | nn.ParameterDict
            ):
                continue
            for adapter in a_dict:
                if adapter not in b_dict or (isinstance(active, list | tuple) and adapter not in active):
                    continue
                a, b = _weight(a_dict[adapter]), _weight(b_dict[adapter])
                if a is None or b is None:
                    continue
                name = path if adapter == "default" else f"{path}/{adapter}"
                found.append(Adapter(name, module, adapter, a, b, base_weight))
        a, b = getattr(module, "lora_a", None), getattr(module, "lora_b", None)
        if isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.dim() == b.dim() == 2:
            found.append(Adapter(path, module, None, a, b, base_weight))
    return [ad for ad in found if ad.a.dim() >= 2 and ad.b.dim() >= 2 and ad.b.shape[1] == ad.a.shape[0]]


def lora_norms(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """‖A‖_F, ‖B‖_F and ‖B·A‖_F of a stack of adapters, from their r × r Gram matrices, in float32.

    Args:
        a: ``(n, r, in)`` — n adapters' A matrices.
        b: ``(n, out, r)`` — their B matrices.

    Returns:
        Three ``(n,)`` float32 vectors (unscaled: multiply ‖B·A‖ by the scaling for ‖ΔW‖).

    Example:
        >>> a, b = torch.eye(2)[None], 3 * torch.eye(2)[None]
        >>> [round(v.item(), 4) for v in lora_norms(a, b)]
        [1.4142, 4.2426, 4.2426]
    """
    a_sq, b_sq, ba_sq = _squares(a, b, factors=True)
    assert a_sq is not None and b_sq is not None
    return a_sq.sqrt(), b_sq.sqrt(), ba_sq.clamp_min(0).sqrt()  # clamp_min keeps NaN: a non-finite adapter shows


def _squares(a: Tensor, b: Tensor, *, factors: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """‖A‖², ‖B‖² (only with ``factors``) and ‖B·A‖² of a stack of adapters: `lora_norms` before its square roots,
    which the probe takes once for all groups."""
    a, b = a.float(), b.float()
    gram_a = torch.bmm(a, a.transpose(1, 2))  # (n, r, r)
    gram_b = torch.bmm(b.transpose(1, 2), b)  # (n, r, r)
    ba_sq = (gram_a * gram_b).sum((1, 2))
    if not factors:
        return None, None, ba_sq
    return gram_a.diagonal(dim1=1, dim2=2).sum(-1), gram_b.diagonal(dim1=1, dim2=2).sum(-1), ba_sq


@dataclass(kw_only=True)
class LoraProbeConfig:
    """Settings of the LoRA probe.

    Attributes:
        every: Cadence in steps.
        per_module: Also emit the per-adapter families (A, B and ΔW norms) on ``log_every`` steps.
    """

    every: int = 1
    per_module: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"LoraProbeConfig.every={self.every!r}; allowed: an int >= 1")


@PROBES.register("lora")
class LoraProbe:
    """Emits each LoRA adapter's ‖A‖, ‖B‖ and ‖ΔW‖, the largest ‖ΔW‖ and the largest ‖ΔW‖/‖W_base‖; nothing (and
    costs nothing) on a model without adapters.

    Example:
        >>> probe = LoraProbe()
        >>> probe.attach(nn.Linear(2, 2))
        >>> probe.adapters
        []
    """

    name = "lora"

    def __init__(self, config: LoraProbeConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LoraProbeConfig, config, fields)
        self.adapters: list[Adapter] | None = None
        self._groups: list[list[Adapter]] = []
        self._known: Tensor | None = None  # indices of the adapters whose base norm is known
        self._known_bases: list[Tensor | None] = []
        self._base_norms: Tensor | None = None
        self._scaling: tuple[list[float], Tensor] | None = None

    def attach(self, model: nn.Module) -> None:
        groups: dict[tuple[object, ...], list[Adapter]] = defaultdict(list)
        for ad in find_adapters(model):
            groups[(ad.a.shape, ad.b.shape, ad.a.dtype, ad.b.dtype, ad.a.device, ad.b.device)].append(ad)
        self._groups = list(groups.values())
        self.adapters = [ad for group in self._groups for ad in group]  # grouped: the norms concatenate in order
        known = [i for i, ad in enumerate(self.adapters) if ad.base is not None and ad.base.is_floating_point()]
        device = self.adapters[0].a.device if self.adapters else torch.device("cpu")
        self._known_bases = [self.adapters[i].base for i in known]
        self._known = torch.tensor(known, dtype=torch.long, device=device) if known else None
        self._base_norms = None
        self._scaling = None
        if self.adapters:  # the scalings' first copy to the device happens here, not in a step
            self._scalings(device)

    def detach(self) -> None:
        self.adapters, self._groups = None, []

    def measure(self, ctx: StepContext) -> Measurements:
        if self.adapters is None:  # used without Guard.attach (a bare probe): find them now
            self.attach(ctx.model)
        if not self.adapters or not due(ctx.step, self.config.every):
            return {}
        device = self.adapters[0].a.device
        # the per-adapter families are stored on log_every steps only: A's and B's norms are not reduced otherwise
        families = self.config.per_module and ctx.log_step
        parts = []
        with torch.no_grad():
            for group in self._groups:
                a = torch.stack([ad.a.detach().flatten(1) for ad in group])  # (g, r, in); a conv's kernel flattened
                b = torch.stack([ad.b.detach().flatten(1) for ad in group])  # (g, out, r)
                parts.append(_squares(a, b, factors=families))
            ba_norm = torch.cat([ba for _, _, ba in parts]).to(device).clamp_min(0).sqrt()  # clamp_min keeps NaN
            delta = ba_norm * self._scalings(device)
        out: Measurements = {keys.LORA_DELTA_NORM_MAX: delta.max()}  # max propagates NaN: a non-finite adapter shows
        if self._known is not None:
            out[keys.LORA_DELTA_RATIO_MAX] = (delta[self._known] / self._base(device)).max()
        if families:
            names = tuple(ad.name for ad in self.adapters)
            a_norm = torch.cat([a for a, _, _ in parts if a is not None]).to(device).sqrt()
            b_norm = torch.cat([b for _, b, _ in parts if b is not None]).to(device).sqrt()
            out[keys.LORA_A_NORM_PER_MODULE] = PerParam(names, a_norm)
            out[keys.LORA_B_NORM_PER_MODULE] = PerParam(names, b_norm)
            out[keys.LORA_DELTA_NORM_PER_MODULE] = PerParam(names, delta)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}

    def _scalings(self, device: torch.device) -> Tensor:
        """Each adapter's scaling, re-read every time (peft can rescale an adapter mid-run); copied to the device at
        attach and again only when one changed (a host-to-device copy, rare: peft's ``scale_layer``)."""
        assert self.adapters is not None
        values = [ad.scaling() for ad in self.adapters]
        if self._scaling is None or self._scaling[0] != values:
            self._scaling = (values, torch.tensor(values, dtype=torch.float32, device=device))
        return self._scaling[1]

    def _base(self, device: torch.device) -> Tensor:
        """‖W_base‖_F of the adapters whose base weight is a float tensor (a 4-bit base gives no ratio): measured
        once, since the base is frozen, or each time when some base weight is itself trained."""
        if self._base_norms is None or any(w is not None and w.requires_grad for w in self._known_bases):
            self._base_norms = per_tensor_norms([w.detach() for w in self._known_bases if w is not None]).to(device)
        return self._base_norms
