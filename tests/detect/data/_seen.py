"""What the recorders share: run a zoo scenario and keep one signal as a default detector saw it, step by step."""

from __future__ import annotations

from typing import Any

from keel.harness.scenarios import create_scenario
from keel.harness.scenarios._common import ScenarioResult


def run_seeing(detector: Any, key: str, name: str, seed: int) -> tuple[ScenarioResult, list[tuple[int, float]]]:
    """Run scenario ``name`` at ``seed``; return its result and the (step, value) of ``key`` that each
    ``detector.update`` (a detector class of the default set) received."""
    seen: list[tuple[int, float]] = []
    update = detector.update

    def spy(self: Any, obs: Any) -> Any:
        if key in obs.values:
            seen.append((obs.step, obs.values[key]))
        return update(self, obs)

    detector.update = spy
    try:
        result = create_scenario(name).run(seed=seed)
    finally:
        detector.update = update
    return result, seen
