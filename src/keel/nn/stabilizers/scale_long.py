"""Stabilizer ``scale_long``: scale the long skip connections a U-Net's decoder blocks receive.

From Huang et al. (2023), "ScaleLong" (NeurIPS 2023, arXiv 2310.13545).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from keel.losses._checks import is_int, is_number
from keel.nn._surgery import first_parameter, has_bias, linear_features
from keel.nn.scale_long import LongSkipCalibration, scale_long_factors
from keel.nn.stabilizers._base import Change, stabilizers

SCALE_LONG_MODES = ("constant", "calibrated")


class SkipScaleHook:
    """Forward pre-hook: multiply the block's ``skip`` argument by a factor, or by a calibration module."""

    def __init__(self, position: int, factor: float, calibration: LongSkipCalibration | None) -> None:
        self.position, self.factor, self.calibration = position, factor, calibration

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "skip" in kwargs:
            kwargs = {**kwargs, "skip": self._scale(kwargs["skip"])}
        elif len(args) > self.position:
            args = (*args[: self.position], self._scale(args[self.position]), *args[self.position + 1 :])
        return args, kwargs

    def _scale(self, skip: Any) -> Any:
        if skip is None:
            return None
        return self.calibration(skip) if self.calibration is not None else skip * self.factor


def _positive_int(value: object) -> bool:
    return is_int(value) and value >= 1  # type: ignore[operator]


def _skip_position(block: nn.Module) -> int | None:
    """Position of the ``skip`` parameter of ``block.forward`` (after self), None if it has none."""
    try:
        names = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("skip") if "skip" in names else None


@stabilizers.register("scale_long")
@dataclass(kw_only=True)
class ScaleLongStabilizer:
    """Scale the long skips of U-Net decoder blocks: κ^(N−1−i) for the i-th of N blocks, or a learned gate.

    Matched structurally: an ``nn.ModuleList`` whose blocks take a ``skip`` argument and own a layer with
    "skip" in its name that fuses it (U-ViT's ``out_blocks`` with ``skip_linear``), or the list named by
    ``blocks``; block i of N gets a forward pre-hook that scales its skip. At κ = 1 outputs are unchanged;
    otherwise the function changes, so apply it before training (the paper), not mid-run.
    ``"calibrated"`` adds one shared `LongSkipCalibration` (the paper's LS) as ``long_skip_calibration`` on
    the list's parent; its layers have biases when the decoder's dense layers do (the model's convention).

    Attributes:
        kappa: κ in (0, 1]; the README suggests [0.5, 0.95].
        mode: ``"constant"`` (CS) or ``"calibrated"`` (LS).
        tokens: The token count L the calibration sees (needed for ``"calibrated"``).
        reduction: The calibration MLP's ratio r (16).
        blocks: Qualified name of the decoder's ModuleList, when the structural rule does not find it.
        bias: Give the calibration's layers biases (True), none (False), or follow the decoder (None).
    """

    name: ClassVar[str] = "scale_long"
    description: ClassVar[str] = "scales U-Net long skips by kappa^(N-1-i) (or a learned gate); steadier diffusion"
    reference: ClassVar[str] = "Huang et al. 2023 (ScaleLong, arXiv 2310.13545); code sail-sg/ScaleLong"
    order: ClassVar[int] = 40

    kappa: float = 0.5
    mode: str = "constant"
    tokens: int | None = None
    reduction: int = 16
    blocks: str | None = None
    bias: bool | None = None

    def __post_init__(self) -> None:
        if not (is_number(self.kappa) and 0 < self.kappa <= 1):
            raise ValueError(f"ScaleLongStabilizer.kappa={self.kappa!r}; allowed: a number in (0, 1]")
        if self.mode not in SCALE_LONG_MODES:
            raise ValueError(f"ScaleLongStabilizer.mode={self.mode!r}; allowed: {', '.join(SCALE_LONG_MODES)}")
        if (self.tokens is not None or self.mode == "calibrated") and not _positive_int(self.tokens):
            raise ValueError(
                f"ScaleLongStabilizer.tokens={self.tokens!r}; allowed: a positive int for mode 'calibrated'"
            )
        if not _positive_int(self.reduction):
            raise ValueError(f"ScaleLongStabilizer.reduction={self.reduction!r}; allowed: a positive int")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise ValueError(f"ScaleLongStabilizer.blocks={self.blocks!r}; allowed: a module name or None")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ValueError(f"ScaleLongStabilizer.bias={self.bias!r}; allowed: True, False or None")

    def _is_decoder(self, name: str, module: nn.Module) -> bool:
        """The list of decoder blocks: named by ``blocks``, else a ModuleList whose every block takes a
        ``skip`` argument and owns a submodule with "skip" in its name (the layer that fuses the skip)."""
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            return False
        if any(_skip_position(block) is None for block in module):
            return False
        if self.blocks is not None:
            return name == self.blocks
        return all(any("skip" in child for child, sub in block.named_children() if sub is not None) for block in module)

    def _bias(self, decoder: nn.Module) -> bool:
        if self.bias is not None:
            return self.bias
        dense = [m for m in decoder.modules() if linear_features(m) is not None]
        return any(has_bias(m) for m in dense) if dense else True

    def apply(self, model: nn.Module) -> list[Change]:
        changes = []
        for name, module in list(model.named_modules()):
            if not self._is_decoder(name, module):
                continue
            positions = [pos for block in module if (pos := _skip_position(block)) is not None]  # each has one
            if any(isinstance(h, SkipScaleHook) for block in module for h in block._forward_pre_hooks.values()):
                continue
            calibration = None
            if self.mode == "calibrated" and self.tokens is not None:  # __post_init__: "calibrated" needs tokens
                anchor = first_parameter(module)
                calibration = LongSkipCalibration(
                    self.tokens, reduction=self.reduction, layout="tokens", bias=self._bias(module)
                )
                if anchor is not None:
                    calibration.to(device=anchor.device, dtype=anchor.dtype)
                parent_name = name.rpartition(".")[0]
                parent = model.get_submodule(parent_name) if parent_name else model
                slot, n = "long_skip_calibration", 1
                while hasattr(parent, slot):
                    slot, n = f"long_skip_calibration_{n}", n + 1
                parent.add_module(slot, calibration)
            factors = scale_long_factors(len(module), self.kappa)
            handles = tuple(
                block.register_forward_pre_hook(SkipScaleHook(pos, factor, calibration), with_kwargs=True)
                for block, pos, factor in zip(module, positions, factors, strict=True)
            )
            how = (
                f"skip of block i of {len(module)} scaled by {self.kappa}^({len(module) - 1}-i)"
                if calibration is None
                else "skips gated by a shared LongSkipCalibration"
            )
            changes.append(
                Change(
                    stabilizer=self.name,
                    name=name,
                    old=module,
                    new=module,
                    handles=handles,
                    how=how,
                    anchor=first_parameter(module),
                    new_parameters=() if calibration is None else tuple(calibration.parameters()),
                )
            )
        return changes
