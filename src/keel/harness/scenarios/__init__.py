"""The scenario zoo: reproducible instabilities and healthy runs with nuisances, each a real CPU training run.

Every scenario trains a small model under an observing `Guard` with keel's transformer probe set
(``probes="transformer"``) and default detectors, and knows what keel should say: the finding kind that
names its instability, or — for a healthy run — that no warning or critical finding may appear.
`keel bench detect` runs them all (`keel.harness.bench.detect`). Scenarios with a ``reference`` also train the same
recipe with the fix applied, which is how "the loss degraded" is judged for instabilities that stall
rather than explode.

Example:
    >>> sorted(list_scenarios())[:2]
    ['attention_entropy_collapse', 'attention_logit_growth']
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from keel._core.registry import Registry
from keel.harness.scenarios._common import ScenarioResult, ScenarioSpec


@runtime_checkable
class Scenario(Protocol):
    """A reproducible run: ``spec`` says what keel should find; ``run`` trains under `Guard`."""

    spec: ScenarioSpec

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult: ...

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        """Losses of the same run with the fix applied (no Guard), or None."""
        ...


SCENARIOS: Registry[Scenario] = Registry("scenario")


def create_scenario(name: str) -> Scenario:
    """Build a registered scenario by name."""
    return SCENARIOS.create(name)


def list_scenarios() -> list[str]:
    return SCENARIOS.names()


from keel.harness.scenarios import (  # noqa: E402,F401  (register built-ins)
    attention_entropy_collapse,
    attention_logit_growth,
    benign_oscillation,
    bf16_healthy,
    curriculum_switch,
    data_outliers,
    eps_dominance,
    fp16_healthy,
    fp16_overflow,
    fp16_scaler_healthy,
    full_finetune,
    lora_finetune,
    lora_high_lr,
    loss_scale_thrash,
    lr_spike,
    moe_healthy,
    moe_load_collapse,
    moe_router_logit_growth,
    noisy_eval_finetune,
    non_finite_origin,
    output_logit_divergence,
    poisoned_batch,
    qat_healthy,
    qat_oscillation,
    qlora_finetune,
    slow_divergence,
    softmax_collapse,
    task_switch,
    warmup_bump,
)

__all__ = ["SCENARIOS", "Scenario", "ScenarioResult", "ScenarioSpec", "create_scenario", "list_scenarios"]
