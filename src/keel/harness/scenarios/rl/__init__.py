"""The RL and preference fine-tuning scenarios: real CPU runs of DPO and GRPO on keel's tiny proxy LM.

Each reproduces one effect from the literature (likelihood displacement in DPO, entropy collapse in GRPO, reward
over-optimisation against a proxy reward model) or is a healthy run, trains under an observing `Guard` with the
loop's own signals (``guard.step(loss, signals=...)``) and knows what keel should say. Scenarios with a remedy also
train it (bare) and report the metric with and without. `keel bench rl` runs them (`keel.harness.bench.rl`),
apart from `keel bench detect`'s pre-training zoo.

Example:
    >>> list_rl_scenarios()[:2]
    ['dpo_displacement', 'dpo_healthy']
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from keel._core.registry import Registry
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl._lm import RLRun


@runtime_checkable
class RLScenario(Protocol):
    """A reproducible RL/preference run: ``spec`` says what keel should find; ``run`` trains it (``quick``: smaller)."""

    spec: ScenarioSpec

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun: ...


RL_SCENARIOS: Registry[RLScenario] = Registry("RL scenario")


def create_rl_scenario(name: str) -> RLScenario:
    """Build a registered RL scenario by name."""
    return RL_SCENARIOS.create(name)


def list_rl_scenarios() -> list[str]:
    return RL_SCENARIOS.names()


from keel.harness.scenarios.rl import (  # noqa: E402,F401  (register built-ins)
    dpo_displacement,
    dpo_healthy,
    grpo_entropy_collapse,
    grpo_healthy,
    reward_healthy,
    reward_overoptimization,
)

__all__ = ["RL_SCENARIOS", "RLRun", "RLScenario", "create_rl_scenario", "list_rl_scenarios"]
