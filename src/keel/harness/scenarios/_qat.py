"""What the quantization-aware-training scenarios share: keel's tiny proxy with StatsQ weights, watched with the
weight-oscillation probe, and confidence-guided annealing (CGA) as the fix of the reference run.

A QAT scenario is a proxy-LM scenario (`LMScenario`) whose recipe fake-quantizes every linear layer but the output
head with OFQ's StatsQ grid (`keel.nn.statsq`); the Guard gets keel's transformer probes plus the opt-in
``weight_oscillation`` probe, and the default detectors (which hold ``qat_oscillation``). It trains on one intra-op
thread, restored after, as the MoE scenarios do (the tiny proxy is too small for a second thread to pay).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from keel.harness.scenarios._common import LMScenario, ScenarioResult, _steps
from keel.nn import fake_quantize
from keel.optim.cga import ConfidenceGuidedAnnealing
from keel.proxy.trainer import train_proxy
from keel.signals import TRANSFORMER_PROBES

OSCILLATION_PROBE = "weight_oscillation"


def statsq_3bit(model: nn.Module) -> nn.Module:
    """The proxy with 3-bit StatsQ weights (the output head kept in full precision): a ``TrainConfig.model_fn``."""
    return fake_quantize(model, "statsq", bits=3)


def qat_probes() -> list[str]:
    """keel's transformer probe set with the weight-oscillation probe."""
    return [*TRANSFORMER_PROBES, OSCILLATION_PROBE]


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def cga_from(step: int) -> Iterator[dict[str, Any]]:
    """Confidence-guided annealing on every optimizer step after the first ``step`` ones, for the model the recipe's
    ``model_fn`` registers in the yielded dict (``state["model"]``).

    The proxy trainer builds its optimizer inside `train_proxy`; process-wide optimizer step hooks reach it without
    a trainer option (harness code: one bare run at a time)."""
    state: dict[str, Any] = {"steps": 0, "cga": None}

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        state["steps"] += 1
        if state["steps"] > step:
            if state["cga"] is None:
                state["cga"] = ConfidenceGuidedAnnealing.for_model(state["model"])
            state["cga"].freeze_()

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if state["cga"] is not None:
            state["cga"].restore_()

    handles = (register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


class QatScenario(LMScenario):
    """A proxy-LM scenario on the StatsQ proxy, watched with the weight-oscillation probe; the reference run (when
    ``cga_step`` is set) is the same recipe with CGA from that step on."""

    cga_step: int | None = None

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        with _one_thread():
            run = train_proxy(_steps(self.recipe(seed), steps), policy="observe", probes=qat_probes())
        return ScenarioResult(
            name=self.spec.name, losses=run.losses, findings=list(run.findings), wall_s=run.wall_s, event_step=None
        )

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        if self.cga_step is None:
            return None
        recipe = _steps(self.recipe(seed), steps)
        with _one_thread(), cga_from(min(self.cga_step, recipe.steps)) as state:

            def quantize_and_keep(model: nn.Module) -> nn.Module:
                state["model"] = statsq_3bit(model) if recipe.model_fn is None else recipe.model_fn(model)
                return state["model"]

            return train_proxy(replace(recipe, model_fn=quantize_and_keep)).losses
