"""Stabilizer ``z_loss``: a `ZLossHook` on the output head, whose ``loss()`` the training loop adds.

z-loss from PaLM (Chowdhery et al. 2022) and Wortsman et al. (2023, arXiv 2309.14322).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from keel.losses.z_loss import DEFAULT_COEFFICIENT, check_coefficient
from keel.nn._surgery import linear_features
from keel.nn.stabilizers._base import Change, stabilizers
from keel.nn.z_loss_hook import ZLossHook

# Names output heads go by: nanoGPT/HF (lm_head), keel proxy/timm (head), Llama reference (output),
# GPT-NeoX (embed_out), Megatron (output_layer).
HEAD_NAMES = ("lm_head", "head", "output", "embed_out", "output_layer")


@stabilizers.register("z_loss")
@dataclass(kw_only=True)
class ZLossStabilizer:
    """Attach a `ZLossHook` to the model's output head; the loop adds ``result.z_loss()`` to its loss.

    The head is ``head`` if given, else the shallowest dense module named one of ``HEAD_NAMES``. The model's
    function is unchanged; the penalty acts only through the loss the loop adds.

    Attributes:
        coefficient: Weight of coefficient·mean(log Z²) (1e-4).
        head: Qualified name of the output head; None finds it by name.
    """

    name: ClassVar[str] = "z_loss"
    description: ClassVar[str] = "records log Z at the output head; adding 1e-4·mean(log Z^2) stops logit drift"
    reference: ClassVar[str] = "Chowdhery et al. 2022 (PaLM, arXiv 2204.02311); Wortsman et al. 2023 (arXiv 2309.14322)"
    order: ClassVar[int] = 30

    coefficient: float = DEFAULT_COEFFICIENT
    head: str | None = None

    def __post_init__(self) -> None:
        check_coefficient(self.coefficient, "ZLossStabilizer.coefficient")
        if self.head is not None and not isinstance(self.head, str):
            raise ValueError(f"ZLossStabilizer.head={self.head!r}; allowed: a submodule name or None")

    def apply(self, model: nn.Module) -> list[Change]:
        found = self._find_head(model)
        if found is None:
            return []
        name, module = found
        for hook in module._forward_hooks.values():
            if isinstance(hook, ZLossHook):
                return [
                    Change(
                        stabilizer=self.name,
                        name=name,
                        old=module,
                        new=module,
                        extra=hook,
                        how="ZLossHook already attached",
                    )
                ]
        hook = ZLossHook(self.coefficient)
        handle = hook.attach(module)
        return [
            Change(
                stabilizer=self.name,
                name=name,
                old=module,
                new=module,
                handles=(handle,),
                extra=hook,
                how="forward hook records log Z of the logits",
            )
        ]

    def _find_head(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        if self.head is not None:
            try:
                return self.head, model.get_submodule(self.head)
            except AttributeError:
                raise ValueError(
                    f"ZLossStabilizer.head={self.head!r}; allowed: a submodule name of the model"
                ) from None
        candidates = [
            (name.count("."), name, module)
            for name, module in model.named_modules()
            if name.rpartition(".")[2] in HEAD_NAMES and linear_features(module) is not None
        ]
        if not candidates:
            return None
        _, name, module = min(candidates, key=lambda c: c[0])
        return name, module
