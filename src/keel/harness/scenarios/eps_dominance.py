"""ε-dominance: gradients far smaller than Adam's ε, so ε sets the update and training slows (Wortsman et al. 2023).

keel's tiny proxy whose loss reaches the optimizer scaled by 1e-6 — a loss normalised by a huge count (tokens of
the whole epoch rather than of the batch, say) — with AdamW's default ε = 1e-8. Adam is invariant to the scale of the
loss only while √v̂ ≫ ε; here the gradients' RMS is ~1e-9, most elements have √v̂ < ε and the update RMS collapses.
The logged loss is the plain cross-entropy (only the backward pass is scaled). The fix is Wortsman et al.'s: ε =
1e-15, with which the same scaled gradients train like the healthy run. The run watches with the Adam ε probe
(default cadence, every 50 steps) and the ε-dominance detector added to the defaults, as a user would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, autograd, nn

from keel.detect import default_detectors
from keel.detect.eps_dominance import EpsDominanceDetector
from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioResult, ScenarioSpec, _steps
from keel.proxy.trainer import TrainConfig, train_proxy
from keel.signals import AdamEpsProbe, Probe

GRAD_SCALE = 1e-6
FIXED_EPS = 1e-15
STEPS = 200
LR = 3e-3


class _ScaleGrad(autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: autograd.function.FunctionCtx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


class ScaledLossModel(nn.Module):
    """Wraps a model so every gradient is ``scale`` times the cross-entropy's: the loss as the optimizer sees it."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: Tensor) -> Tensor:
        return _ScaleGrad.apply(self.model(x), self.scale)


def scaled_loss(model: nn.Module) -> nn.Module:
    return ScaledLossModel(model, GRAD_SCALE)


def adam_eps(model: nn.Module, loss: Callable[[], Tensor]) -> Sequence[Probe]:
    return [AdamEpsProbe()]


@SCENARIOS.register("eps_dominance")
class EpsDominance(LMScenario):
    spec = ScenarioSpec(
        name="eps_dominance",
        healthy=False,
        expected_kind="eps_dominance",
        summary=f"tiny proxy, loss scaled by {GRAD_SCALE:g} into AdamW with ε=1e-8: ε sets the update",
        fix=f"ε = {FIXED_EPS:g}",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=STEPS, lr=LR, model_fn=scaled_loss, extra_probes=adam_eps, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(
            size="tiny", steps=STEPS, lr=LR, eps=FIXED_EPS, model_fn=scaled_loss, extra_probes=adam_eps, seed=seed
        )

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        """Train under an observing `Guard` with the transformer probes, the Adam ε probe, and the default
        detectors plus the ε-dominance detector."""
        detectors = [*default_detectors(), EpsDominanceDetector()]
        run = train_proxy(_steps(self.recipe(seed), steps), policy="observe", detectors=detectors)
        return ScenarioResult(name=self.spec.name, losses=run.losses, findings=list(run.findings), wall_s=run.wall_s)
