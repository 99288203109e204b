"""Task switch with replay: the stability gap (De Lange et al. 2023, arXiv 2205.13452).

An MLP learns task A (classes 0 and 1 of four synthetic Gaussian classes) for 150 steps, then task B (classes 2
and 3) with half of each batch replayed from a memory of task A; SGD, LR 0.1, momentum 0.9 (`_continual`).
Task A's held-out accuracy (``eval/A``, every 2 steps, 500 examples) falls from ~0.99 to ~0.3–0.6 within ten
steps of the switch and climbs back to ~0.9: a transient collapse of an earlier task's metric right after a
switch, which keel should name ``stability_gap`` with its depth. A drop that recovers is not an instability of
the loss: the training loss only jumps at the switch, when the unseen classes arrive.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios._continual import ContinualConfig, ContinualResult, train_continual

SWITCH_STEP, STEPS = 150, 400


@SCENARIOS.register("task_switch")
class TaskSwitch:
    spec = ScenarioSpec(
        name="task_switch",
        healthy=False,
        expected_kind="stability_gap",
        summary=f"MLP on task A, then task B with replay from step {SWITCH_STEP} (SGD momentum 0.9): task A's "
        "held-out accuracy collapses right after the switch and recovers",
    )
    event_step = SWITCH_STEP

    def config(self, seed: int, steps: int | None = None) -> ContinualConfig:
        """The recipe; ``steps`` shortens (or lengthens) the run, the switch staying at step 150."""
        return ContinualConfig(steps=steps or STEPS, switch_step=SWITCH_STEP, seed=seed)

    def run(self, *, seed: int = 0, steps: int | None = None) -> ContinualResult:
        return train_continual(self.config(seed, steps), name=self.spec.name, event_step=SWITCH_STEP)

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        """None: the gap is judged on the eval itself, not against a fixed run's loss."""
        return None
