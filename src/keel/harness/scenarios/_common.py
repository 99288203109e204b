"""What every scenario shares: its description, its result, and the base of the proxy-LM scenarios.

Each scenario is a real training run of a small model under `Guard(policy="observe")` with keel's transformer
probe set and default detectors (plus the probes a scenario needs, such as sharpness): detection must come from
what a user would get, not from a detector tuned for one trace. A proxy-LM scenario is a config factory: it
builds a `keel.proxy.trainer.TrainConfig` (its fault injected through the config's hooks) and trains it with
`keel.proxy.trainer.train_proxy`, the trainer every proxy run uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from keel._core.finding import Finding, severity_rank
from keel.proxy.trainer import TrainConfig, train_proxy


@dataclass(frozen=True, kw_only=True)
class ScenarioSpec:
    """What a scenario is and what keel should say about it.

    Attributes:
        name: The registry name (the file stem).
        healthy: True for a healthy run with a nuisance: no warning or critical finding is allowed.
        expected_kind: The finding kind that names the instability (None when healthy).
        summary: One line: the setting and the mechanism.
        lead_required: The detection must come before the loss degrades (predictive detectors).
        fix: What the reference ("fixed") run changes, when the scenario has one.
    """

    name: str
    healthy: bool
    expected_kind: str | None
    summary: str
    lead_required: bool = False
    fix: str = ""


@dataclass
class ScenarioResult:
    """One scenario run: the loss curve, what keel found, and the known event step if any."""

    name: str
    losses: list[float]
    findings: list[Finding]
    wall_s: float
    event_step: int | None = None

    def alarms(self) -> list[Finding]:
        """Warning and critical findings, in step order."""
        return [f for f in self.findings if severity_rank(f.severity) >= 1]


class LMScenario:
    """Base of the proxy-LM scenarios: a recipe, optionally a fixed recipe, optionally a known event step."""

    spec: ScenarioSpec
    event_step: int | None = None

    def recipe(self, seed: int) -> TrainConfig:
        """The unstable (or healthy) run this scenario trains; every scenario module defines its own."""
        raise NotImplementedError(f"{type(self).__name__} defines no recipe")

    def fixed(self, seed: int) -> TrainConfig | None:
        """The recipe with the fix applied (the reference run), or None."""
        return None

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        """Train the recipe under an observing `Guard` with keel's transformer probes and default detectors."""
        run = train_proxy(_steps(self.recipe(seed), steps), policy="observe")
        return ScenarioResult(
            name=self.spec.name,
            losses=run.losses,
            findings=list(run.findings),
            wall_s=run.wall_s,
            event_step=self.event_step,
        )

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        """Losses of the fixed recipe trained bare (no Guard), or None without one."""
        recipe = self.fixed(seed)
        return None if recipe is None else train_proxy(_steps(recipe, steps)).losses


def _steps(config: TrainConfig, steps: int | None) -> TrainConfig:
    return config if steps is None else replace(config, steps=steps)
