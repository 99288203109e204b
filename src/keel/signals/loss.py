"""Loss probe: the training loss of the step.

| key    | cadence    | cost                         |
|--------|------------|------------------------------|
| `loss` | every step | none (the loss already exists) |
"""

from __future__ import annotations

from keel._core import keys
from keel.signals.probe import Measurements, StepContext
from keel.signals.registry import PROBES


@PROBES.register("loss")
class LossProbe:
    name = "loss"

    def measure(self, ctx: StepContext) -> Measurements:
        return {keys.LOSS: ctx.loss}

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
