"""Divergence detector: a sustained rise of the loss above the best level it had reached.

Compares the median of the last ``short`` values (robust to single outliers) with the lowest such median
seen so far. A rise of ``warn_excess`` lasting ``patience`` steps is a ``warning``; reaching
``critical_excess`` is ``critical`` — skipping steps cannot fix it; rolling back and lowering the learning
rate can (PaLM, OPT-175B logbooks: restart earlier with a lower LR). This catches the slow divergence that
single-step spike rules miss (llm-foundry's "persistently high loss" rule addresses the same gap).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import require_ints
from keel.detect.detector import DETECTORS
from keel.detect.robust import median as _median


@dataclass(kw_only=True)
class DivergenceConfig:
    """Settings of the divergence detector.

    Attributes:
        signal: The signal key watched (a loss: lower is better).
        short: Values in the rolling median.
        min_history: Steps before anything is flagged (the loss falls fast early on).
        warn_excess: Relative rise over the best median that counts (0.25 = 25 % above the best).
        critical_excess: Relative rise that makes the finding critical (1.0 = twice the best).
        patience: Consecutive steps above ``warn_excess`` before a finding.
    """

    signal: str = keys.LOSS
    short: int = 9
    min_history: int = 50
    warn_excess: float = 0.25
    critical_excess: float = 1.0
    patience: int = 10

    def __post_init__(self) -> None:
        require_ints(self, "short", "min_history", "patience")
        if not 0 < self.warn_excess <= self.critical_excess:
            raise ValueError(
                f"DivergenceConfig.warn_excess={self.warn_excess!r}, critical_excess={self.critical_excess!r}; "
                "allowed: 0 < warn_excess <= critical_excess"
            )


@DETECTORS.register("divergence")
class DivergenceDetector:
    """Flags a loss that has risen well above its best level and stays there.

    Example:
        >>> from keel._core import Observation
        >>> det = DivergenceDetector()
        >>> losses = [2.0] * 60 + [6.0] * 20
        >>> found = [f for s, v in enumerate(losses) for f in det.update(Observation(step=s, values={"loss": v}))]
        >>> [(f.step, f.severity) for f in found]
        [(73, 'critical')]
    """

    name = "divergence"

    def __init__(self, config: DivergenceConfig | None = None) -> None:
        self.config = config or DivergenceConfig()
        self._recent: deque[float] = deque(maxlen=self.config.short)
        self._seen = 0
        self._best = math.inf
        self._best_step = -1
        self._run = 0
        self._reported: Severity | None = None

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(cfg.signal)
        if x is None or not math.isfinite(x):
            return []
        self._recent.append(x)
        self._seen += 1
        if len(self._recent) < cfg.short:
            return []
        median = _median(self._recent)
        if median < self._best:
            self._best, self._best_step = median, obs.step
        excess = (median - self._best) / (abs(self._best) + 1e-12)
        if self._seen < cfg.min_history or excess < cfg.warn_excess:
            if excess < cfg.warn_excess / 2:  # hysteresis: the episode ends once the loss is back down
                self._run, self._reported = 0, None
            return []
        self._run += 1
        if self._run < cfg.patience:
            return []
        severity: Severity = "critical" if excess >= cfg.critical_excess else "warning"
        if self._reported == severity or self._reported == "critical":
            return []
        self._reported = severity
        evidence = {"median": round(median, 6), "best": round(self._best, 6), "best_step": self._best_step,
                    "excess": round(excess, 4), "onset_step": obs.step - self._run + 1}
        cause = (f"The loss's running median has stayed {1 + excess:.3g}× its best level (step "
                 f"{self._best_step}) for {self._run} steps: training is diverging, not spiking.")
        remedy = ("Roll back to a snapshot before the onset and continue with a lower learning rate "
                  "(policy='recover'; PaLM and OPT-175B restarted earlier with a lower LR); check attention "
                  "logits and consider QK-norm and z-loss (Wortsman et al. 2023).")
        return [Finding(step=obs.step, kind="divergence", severity=severity, signal=cfg.signal, value=median,
                        baseline=self._best, evidence=evidence, cause=cause, remedy=remedy)]

    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "recent": list(self._recent), "seen": self._seen,
                "best": self._best, "best_step": self._best_step, "run": self._run, "reported": self._reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = DivergenceConfig(**state["config"])
        self._recent = deque(state["recent"], maxlen=self.config.short)
        self._seen, self._best, self._best_step = state["seen"], state["best"], state["best_step"]
        self._run, self._reported = state["run"], state["reported"]
