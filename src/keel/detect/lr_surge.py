"""LR surge: an update whose learning rate is far above any this run has used, caught before it is applied.

Reads ``lr`` and the per-group ``lr/<i>`` (the learning rate of each parameter group as the optimizer is about to step,
keel's LR back-off included: `Guard` records them on every step, host values, nothing measured on the device).

One update at 100× the learning rate — a schedule that returns the wrong value for one step, a hand-written LR
formula with a bad factor — moves the weights about 100× as far as the updates around it: in a Muon + AdamW loop
of nanochat's shape the update ratio ‖Δθ‖/‖θ‖ jumps 0.004 → 0.365 at that update and the loss 2.4 → 10.0 on the
next step, above its starting level; minGPT's and litgpt's loops show it as a rise of 1.3–1.7× that lasts 10–20
steps. The loss and gradient-norm detectors name such a rise late or not at all (a loss z of 9 is below the
critical 12, a rise of 1.3× is inside the divergence margin), and by then the update is in the weights. The
learning rate itself says it before the update: this detector calls the step critical when a group's learning
rate is more than ``factor`` times the highest it has had so far in the run, and a critical ``lr_surge`` is a
finding a skip mends (`keel.detect._finding.SKIPPABLE_KINDS`): under ``skip`` and ``recover`` the update is not
applied, so nothing needs rolling back.

What stays quiet, by construction: warm-up, whatever its shape — linear (its second learning rate can be any multiple
of its first: ``LinearLR(start_factor=1e-3, total_iters=10)`` goes ×101, so a group is judged from its third learning
rate > 0 on; a learning rate of 0 sets no reference), then at most ×2 a step; exponential; an LR range test's ×1.1 a
step —, schedule restarts
and re-warming (cosine with warm restarts, WSD, one-cycle: they return to a learning rate the run has had), decay,
keel's own LR back-off and its ramp back, a group added or unfrozen later (its first learning rate sets its
reference). A constant warm-up that jumps ×10 at its end (He et al. 2016's ResNet-110: 0.01, then 0.1; torch's
``SequentialLR`` example with ``ConstantLR(factor=0.1)``) is under the default factor of 30.

A loop that means to raise its learning rate that far gets ``KEPT_AFTER`` (3) updates skipped, each a critical
finding; when the step after them still has the raised learning rate, it is taken as the loop's own choice — a
``warning``, and the new reference — so a deliberate raise costs three updates, never a run of skips, while a surge
that lasts two updates (a schedule bug: an HF Trainer run whose LR was ×265 for updates 12 and 13 had its loss go
3.7 → 16 when the second was applied) is skipped whole. A scheduler keel steps (`Guard(scheduler=...)`, the HF and
Lightning callbacks) or whose call `keel.watch` withholds after a skipped update is stepped after a skip for a surge
all the same (`skipped_for_a_surge`): the schedule's next value replaces a surge it made, one skipped update —
withheld, the surged value stayed, was refused three times and then taken (torchtune's LambdaLR at ×100 for one
step: the bare run's damage, three updates late). Only consecutive steps are judged: on a log read every ``n`` steps
(`keel doctor`), the learning rates in between are unknown and a warm-up can rise far between two logged ones.

A learning rate of NaN or +Inf (a schedule that divided by zero or overflowed) is a surge at any step, the first
included, and is never taken as the loop's own: an update at it writes NaN/Inf into every weight it touches, and the
non-finite detector reads the loss, gradients and weights, not the learning rate — before, such an update was applied
(h30-A F3). In `keel doctor` a log whose ``lr`` column holds a literal ``nan`` is named so too (an empty cell is no
value).

Limits: an update blow-up that the learning rate does not show (an optimizer state gone bad, an update rule that
scales itself) is not seen here; a surge under ``factor`` (a one-step ×10) is not judged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.decision import Decision
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS

KIND = "lr_surge"
KEPT_AFTER = 3  # steps in a row a surge is refused before it is taken as the loop's own learning rate
GROUP_PREFIX = keys.LR + "/"  # ``lr/<i>``: group i's learning rate, recorded where it differs from group 0's


@dataclass(kw_only=True)
class LrSurgeConfig:
    """Settings of the LR-surge detector.

    Attributes:
        factor: A learning rate more than this many times the highest the group has had so far is a surge.
    """

    factor: float = 30.0

    def __post_init__(self) -> None:
        check_types(self)
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"LrSurgeConfig.factor={self.factor!r}; allowed: a finite number > 1")


def learning_rates(values: dict[str, float]) -> dict[str, float]:
    """The learning rates in an observation's values, by key: ``lr`` and each group's ``lr/<i>``.

    Example:
        >>> learning_rates({"loss": 2.0, "lr": 0.1, "lr/2": 0.5, "lr/x": 1.0})
        {'lr': 0.1, 'lr/2': 0.5}
    """
    return {
        key: value
        for key, value in values.items()
        if key == keys.LR or (key.startswith(GROUP_PREFIX) and key[len(GROUP_PREFIX) :].isdigit())
    }


@DETECTORS.register("lr_surge")
class LrSurgeDetector:
    """Flags an update whose learning rate is more than ``factor`` times the highest its group has had.

    In `default_detectors`: a few dictionary look-ups and comparisons per step, nothing on the device.

    Example:
        >>> from keel._core import Observation
        >>> det = LrSurgeDetector()
        >>> lrs = [1e-3 * min(s + 1, 5) / 5 for s in range(12)]  # warm-up to 1e-3, then constant
        >>> lrs[8] *= 100  # one update at 100x
        >>> found = [f for s, lr in enumerate(lrs) for f in det.update(Observation(step=s, values={"lr": lr}))]
        >>> [(f.step, f.severity, f.evidence["ratio"]) for f in found]
        [(8, 'critical', 100.0)]
    """

    name = "lr_surge"
    reads = (keys.LR,)
    rests_when_finite = False

    def __init__(self, config: LrSurgeConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LrSurgeConfig, config, fields)
        self._highest: dict[str, float] = {}  # by key: the highest learning rate taken so far (> 0)
        self._taken: dict[str, int] = {}  # by key: how many learning rates > 0 were taken (counted up to 2)
        self._refused: dict[str, int] = {}  # by key: steps in a row, up to the last judged, that surged (refused)
        self._last_step: int | None = None

    def update(self, obs: Observation) -> list[Finding]:
        if keys.LR not in obs.values:
            return []
        judged = self._last_step is not None and obs.step == self._last_step + 1
        self._last_step = obs.step
        refused_before, self._refused = self._refused, {}
        surges = []  # (key, lr, highest, kept)
        for key, lr in learning_rates(obs.values).items():
            if math.isnan(lr) or lr == math.inf:  # an update at it writes NaN/Inf into the weights: never taken
                surges.append((key, lr, self._highest.get(key, 0.0), False))
                continue
            if not (math.isfinite(lr) and lr > 0):
                continue  # 0: a frozen group or a warm-up's start, no reference
            highest, taken = self._highest.get(key, 0.0), self._taken.get(key, 0)
            if judged and taken >= 2 and lr > self.config.factor * highest:
                refused = refused_before.get(key, 0)
                kept = refused >= KEPT_AFTER  # still there after that many skipped steps: the loop's own choice
                surges.append((key, lr, highest, kept))
                if not kept:
                    self._refused[key] = refused + 1
                    continue
            self._highest[key], self._taken[key] = max(lr, highest), min(taken + 1, 2)
        return [self._finding(obs.step, surges)] if surges else []

    def _finding(self, step: int, surges: list[tuple[str, float, float, bool]]) -> Finding:
        """One finding for the step: critical when a group's surge is new, a warning when every one was kept; named
        after the group with the largest ratio, every surging group in the evidence."""
        new = [s for s in surges if not s[3]]
        broken = [s for s in new if not math.isfinite(s[1])]
        key, lr, highest, _ = broken[0] if broken else max(new or surges, key=lambda s: s[1] / s[2])
        ratio = lr / highest if highest > 0 else math.inf
        if broken:
            text = (
                f"The learning rate ({key}) is {lr}: an update at it writes NaN/Inf into the weights (a schedule that "
                "divided by zero or overflowed, an LR formula fed a NaN)."
            )
        elif new:
            text = (
                f"The learning rate ({key}) is {lr:.3g}, {ratio:.3g}x the highest this run had used ({highest:.3g}), "
                f"more than {self.config.factor:g}x: one update at that rate moves the weights about {ratio:.3g}x as "
                "far as the updates before it."
            )
        else:
            text = (
                f"The learning rate ({key}) is {lr:.3g}, {ratio:.3g}x the highest this run had used before "
                f"({highest:.3g}), for {KEPT_AFTER + 1} steps in a row: keel takes it as the loop's own and judges "
                "from it on."
            )
        return explained_finding(
            step=step,
            kind=KIND,
            severity="critical" if new else "warning",
            signal=key,
            value=lr,
            baseline=highest,
            evidence={
                "ratio": round(ratio, 6),
                "factor": self.config.factor,
                "groups": {k: round(v / h, 6) if h > 0 else math.inf for k, v, h, _ in surges},
                "kept": not new,
            },
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "highest": dict(self._highest),
            "taken": dict(self._taken),
            "refused": dict(self._refused),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LrSurgeConfig(**state["config"])
        self._highest = {str(k): float(v) for k, v in state["highest"].items()}
        self._taken = {str(k): int(v) for k, v in state["taken"].items()}
        self._refused = {str(k): int(v) for k, v in state["refused"].items()}  # (before KEPT_AFTER: 1 per key)
        self._last_step = None if state["last_step"] is None else int(state["last_step"])


def skipped_for_a_surge(decision: Decision) -> bool:
    """Whether ``decision`` skipped its update for an LR surge: the scheduler is stepped after it all the same (keel's
    own, the loop's under `keel.watch`), so that a surge the schedule made is replaced by its next value; the
    schedule is then one step ahead of the updates applied."""
    return decision.action == "skip" and any(
        f.kind == "lr_surge" and f.severity == "critical" for f in decision.findings
    )
