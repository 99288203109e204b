"""An LR spike: the learning rate jumps 30× for ten steps (a scheduler restored with the wrong state).

A healthy tiny-proxy run at LR 3e-3 whose schedule multiplies the LR by 30 at steps 150–159. The sharpness
probe (on a fixed batch, every 50 steps and whenever the LR doubles) measures the curvature in the very
step the LR jumps, before the update is applied: the stability margin is far beyond 1, and the loss
spikes only after the update. The reference is the run without the jump.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import TrainConfig
from keel.signals import Probe
from keel.signals.sharpness import SharpnessProbe

SPIKE = range(150, 160)
FACTOR = 30.0


def spike(step: int) -> float:
    return FACTOR if step in SPIKE else 1.0


def sharpness(model: nn.Module, loss: Callable[[], Tensor]) -> Sequence[Probe]:
    return [SharpnessProbe(loss, every=50, iters=8, trace_probes=0)]


@SCENARIOS.register("lr_spike")
class LRSpike(LMScenario):
    spec = ScenarioSpec(
        name="lr_spike",
        healthy=False,
        expected_kind="edge_of_stability",
        summary=f"healthy tiny proxy whose LR jumps {FACTOR:g}× at steps {SPIKE.start}–{SPIKE.stop - 1}",
        fix="no LR jump",
    )
    event_step = SPIKE.start

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=220, lr=3e-3, lr_factor=spike, extra_probes=sharpness, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=220, lr=3e-3, seed=seed)
