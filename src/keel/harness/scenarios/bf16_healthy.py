"""A healthy bfloat16 run: the tiny proxy trained with bf16 weights, activations and gradients, watched for numerics.

The whole model is cast to bfloat16 (no float32 master weights: the plainest low-precision setup) and trained at
the proxy's default LR 1e-3 with AdamW. bf16 keeps float32's exponent range, so nothing comes near overflow or
underflow (the `numerics` probe runs along: headroom ~125 doublings); its 8-bit mantissa makes the loss a little
noisier and drops the smallest updates, which no detector may mistake for an instability. keel must raise nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig
from keel.signals.numerics import NumericsProbe


def to_bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


@SCENARIOS.register("bf16_healthy")
class Bf16Healthy(LMScenario):
    spec = ScenarioSpec(
        name="bf16_healthy",
        healthy=True,
        expected_kind=None,
        summary="tiny proxy in pure bfloat16 at LR 1e-3: coarser rounding and a noisier loss, nothing else",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(
            size="tiny", steps=200, seed=seed, model_fn=to_bf16, extra_probes=lambda model, loss: [NumericsProbe()]
        )
