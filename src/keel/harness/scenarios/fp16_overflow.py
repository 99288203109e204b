"""fp16 overflow creeping up: the residual stream grows towards float16's 65504 under mixed precision, then overflows.

keel's tiny proxy (2 layers, d=64) trained under CPU autocast in float16 (fp32 master weights, the matmuls in fp16,
as ``torch.autocast`` runs a mixed-precision model), at a constant peak LR of 0.1 with AdamW, no weight decay and
QK-norm (so the attention logits, bounded, are not what overflows). The final LayerNorm makes the loss blind to the
residual stream's scale, so nothing stops the blocks' weights, and with them the block outputs, from growing: the
largest block output climbs from ~1e3 at step 20 to 6e4 and the next fp16 matmul overflows — the loss turns NaN at
step 149, 224 and 129 for seeds 0, 1, 2. The detector (`keel.detect.activation_growth`) reads the activation probe's
``act/max_abs`` against fp16's max. The healthy counterpart is `fp16_healthy` (the same recipe at LR 0.01).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig

STEPS = 300


class Float16Autocast(nn.Module):
    """Runs the wrapped model's forward under ``torch.autocast`` in float16 on its device; returns float32 logits.

    The loss (cross-entropy) then runs in float32, as autocast would run it; the blocks keep their names under
    ``model.`` so keel's probes find them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.float16):
            return self.model(*args, **kwargs).float()


def autocast_fp16(model: nn.Module) -> nn.Module:
    """A `TrainConfig.model_fn`: the proxy under float16 autocast."""
    return Float16Autocast(model)


def fp16_recipe(seed: int, lr: float) -> TrainConfig:
    """The tiny proxy under fp16 autocast, constant LR ``lr`` after a 20-step warm-up, no weight decay, QK-norm."""
    return TrainConfig(
        size="tiny",
        steps=STEPS,
        lr=lr,
        min_lr_ratio=1.0,
        weight_decay=0.0,
        qk_norm=True,
        model_fn=autocast_fp16,
        seed=seed,
    )


@SCENARIOS.register("fp16_overflow")
class Fp16Overflow(LMScenario):
    spec = ScenarioSpec(
        name="fp16_overflow",
        healthy=False,
        expected_kind="activation_growth",
        summary="tiny proxy under fp16 autocast at constant LR 0.1, no weight decay: block outputs creep up to "
        "fp16's 65504 and overflow to NaN",
        lead_required=True,
    )

    def recipe(self, seed: int) -> TrainConfig:
        return fp16_recipe(seed, lr=0.1)
