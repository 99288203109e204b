"""Rank-outlier detector: names the rank whose gradients or loss disagree with the other ranks' over time.

A faulty worker (bad memory, a flaky device) or a bad data shard shows up on one rank only. DDP averages
the gradients, so after the step every rank looks the same; `RankSync` therefore measures each rank's own
gradient before averaging and sends these per-rank features along with the step's signals:

- ``rank/loss/<r>``            the rank's loss,
- ``rank/grad/local_norm/<r>`` the norm of its own gradient (compared in log space),
- ``rank/grad/cos/<r>``        the cosine of its gradient to the mean of the other ranks' (compared as 1 − cos).

At each step every rank's feature is compared with the median of the other ranks' (same model, other data),
which removes what training does to all ranks alike. Of that deviation the detector keeps, per rank, a long
history (a slowly forgetting mean) and a short one (a fast moving average), after MUD-HoG's long/short
"histories of gradients" for federated clients (Gupta et al. 2022): the long history exposes a rank that is
*persistently* off (MUD-HoG's malicious clients), the short one a rank that *became* off (its unreliable
clients). Both rules are one-sided — a higher loss, a larger gradient, a lower cosine is worse — and measured
against the deviations' own step-to-step noise:

- **onset**: the short history has risen ``z`` standard errors above the long one (a median, so a one-batch
  outlier — healthy data has them — never counts; a lasting change is named after about half the window);
- **persistent**: the long history sits ``z`` standard errors and ``min_effect`` per-step noise units above 0.

With two ranks the cosine is the same for both (each is the other's only reference), so it names no rank;
the loss and the gradient norm still name the worse one. Two more checks run every step: a rank whose loss
or gradient is non-finite while others' are not, and — for replicated (DDP) training — ranks whose averaged
gradient norms differ (replicas that should be identical are not: silent data corruption; metaseq compares
them the same way).

Findings are ``warning``\\ s of kind ``rank_outlier``: the reduced signals already carry the fault into every
rank's decision (a NaN on one rank makes every rank skip), so this detector only says *where* it came from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, require_ints, require_positive
from keel.detect._deviation_history import DeviationHistory
from keel.detect.robust import median

# (per-rank family, feature name); `_deviations` turns each into a "higher is worse" deviation
FEATURES: tuple[tuple[str, str], ...] = (
    (keys.RANK_LOSS_PER_RANK, "loss"),
    (keys.RANK_GRAD_LOCAL_NORM_PER_RANK, "grad_norm"),
    (keys.RANK_GRAD_COS_PER_RANK, "disagreement"),
)
FAULT_FAMILIES = (keys.RANK_LOSS_PER_RANK, keys.RANK_GRAD_NORM_PER_RANK, keys.RANK_GRAD_LOCAL_NORM_PER_RANK)
CLIP = 3.0  # the farthest from the recent median a step may pull the long history, in noise units
NOISE_WINDOW = 32  # step-to-step changes kept per rank for the noise scale
MEDIAN_ABS_DIFF = 0.6745 * math.sqrt(2)  # median |X − Y| / σ for independent normal X, Y
MEDIAN_SE = 1.2533  # standard error of a median of n normal values: 1.2533 σ / √n


def _deviations(feature: str, values: list[float], flagged: set[int] = frozenset()) -> list[float]:  # type: ignore[assignment]
    """Each rank's deviation from the median of the other ranks at this step, "higher is worse".

    Comparing ranks at the same step removes what training does to every rank alike (the loss falling, the
    gradient norm shrinking), so the deviations stay comparable over the whole run: relative for the loss,
    in log space for gradient norms, as 1 − cosine for the cosine. Ranks already ``flagged`` are left out of
    the others' reference while any other rank remains, so one bad rank does not shift its peers.
    """
    if feature == "grad_norm":
        x = [math.log(v) if v > 0 else math.nan for v in values]
    elif feature == "disagreement":
        x = [1.0 - v for v in values]
    else:
        x = list(values)
    out = []
    for r, v in enumerate(x):
        others = [u for i, u in enumerate(x) if i != r and i not in flagged]
        centre = median(others or [u for i, u in enumerate(x) if i != r])
        out.append((v - centre) / (abs(centre) + 1e-12) if feature == "loss" else v - centre)
    return out


@dataclass(kw_only=True)
class RankOutlierConfig:
    """Settings of the rank-outlier detector.

    Attributes:
        warmup: Steps of history before anything is flagged (more than ``short_window``).
        short_window: Steps in the short history (their median: a one-batch outlier does not move it).
        long_alpha: Forgetting rate of the long history (0.01 ≈ the last hundred steps; a plain mean before).
        z: How many standard errors a history must be off to count (both rules).
        min_effect: How far, in per-step noise units, a long history must be off for ``persistent``.
        replica_rtol: Relative difference above which averaged gradient norms of replicas count as different.
        replicated: Whether the ranks hold replicas (DDP), so their averaged gradient norms must agree.
    """

    warmup: int = 20
    short_window: int = 9
    long_alpha: float = 0.01
    z: float = 6.0
    min_effect: float = 1.5
    replica_rtol: float = 1e-5
    replicated: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "warmup", "short_window")
        if self.warmup <= self.short_window:
            raise ValueError(f"RankOutlierConfig.warmup={self.warmup!r}; allowed: > short_window ({self.short_window})")
        require_positive(self, "z", "min_effect", "replica_rtol")
        if (
            isinstance(self.long_alpha, bool)
            or not isinstance(self.long_alpha, (int, float))
            or not 0 < self.long_alpha < 1
        ):
            raise ValueError(f"RankOutlierConfig.long_alpha={self.long_alpha!r}; allowed: 0 < long_alpha < 1")


class _History(DeviationHistory):
    """One rank's deviation in one feature; its long mean reads 0 (no offset) before it took any value."""

    @property
    def long(self) -> float:
        return self.long_sum / self.long_weight if self.long_weight > 0 else 0.0


class RankOutlierDetector:
    """Names a faulty rank or a bad data shard from the per-rank features `RankSync` adds to each step.

    Example:
        >>> det = RankOutlierDetector(RankOutlierConfig(warmup=10))
        >>> for step in range(40):
        ...     loss = [2.0 + 0.01 * (step % 3), 2.0 + 0.01 * (step % 2) + (3.0 if step >= 20 else 0.0)]
        ...     found = det.update(Observation(step=step, per_param={"rank/loss/": (("0", "1"), loss)}))
        ...     if found:
        ...         print(step, found[0].evidence["rank"], found[0].evidence["rule"])
        24 1 onset
    """

    name = "rank_outlier"

    def __init__(self, config: RankOutlierConfig | None = None) -> None:
        self.config = config or RankOutlierConfig()
        self._hist: dict[str, list[_History]] = {}
        self._flagged: dict[str, str] = {}  # "<feature>/<rank>" → rule, while the rank stays flagged

    def update(self, obs: Observation) -> list[Finding]:
        found = self._faults(obs)
        for family, feature in FEATURES:
            names, values = obs.per_param.get(family, ((), []))
            if len(values) < 2 or not all(math.isfinite(v) for v in values):
                continue  # a non-finite rank is reported by _faults; keep it out of every history
            flagged = {int(k.rsplit("/", 1)[1]) for k in self._flagged if k.rsplit("/", 1)[0] == feature}
            d = _deviations(feature, values, flagged)
            if not all(math.isfinite(v) for v in d):
                continue
            hist = self._hist.get(feature)
            if hist is None or len(hist) != len(d):  # first step, or the world size changed: start over
                hist = self._hist[feature] = [_History() for _ in d]
                self._flagged = {k: v for k, v in self._flagged.items() if not k.startswith(feature + "/")}
            found += self._judge(obs.step, family, feature, names, values, d, hist)
        return found

    # ------------------------------------------------------------------------------------------------
    def _judge(
        self,
        step: int,
        family: str,
        feature: str,
        names: tuple[str, ...],
        raw: list[float],
        d: list[float],
        hist: list[_History],
    ) -> list[Finding]:
        c = self.config
        for h, v in zip(hist, d, strict=True):
            h.recent = [*h.recent[-(c.short_window - 1) :], v]
        # One noise scale for all ranks (the median of theirs, each the median of its recent step-to-step
        # changes): neither a bad rank's own noise nor a one-batch outlier can excuse or name a rank.
        sigma = (
            max(median([median(h.diffs) for h in hist if h.diffs]) / MEDIAN_ABS_DIFF, 1e-3)
            if hist[0].diffs
            else math.inf
        )
        short_se = sigma * MEDIAN_SE / math.sqrt(c.short_window)  # standard error of the recent median
        found: list[Finding] = []
        changed = False
        for r, h in enumerate(hist):
            key = f"{feature}/{r}"
            if key in self._flagged:
                # Hysteresis: flagged at z standard errors, cleared only within one, so a marginal fault
                # makes one finding rather than a flicker.
                back = (
                    h.short - h.long < short_se if self._flagged[key] == "onset" else h.short < c.min_effect / 3 * sigma
                )
                if back:
                    del self._flagged[key]
                    changed = True
                continue
            if h.n < c.warmup:
                continue
            if h.long_weight == 0:
                continue
            long_se = sigma * max(math.sqrt(c.long_alpha / (2 - c.long_alpha)), 1 / math.sqrt(h.long_weight))
            rule, score = "", 0.0  # h.long does not hold this step yet: "persistent" means off before it
            if h.long > max(c.z * long_se, c.min_effect * sigma):
                rule, score = "persistent", h.long / sigma
            elif h.short - h.long > c.z * short_se:
                rule, score = "onset", (h.short - h.long) / short_se
            if rule:
                self._flagged[key] = rule
                changed = True
                found.append(self._finding(step, family, feature, names, raw, r, rule, score, h))
        for r, (h, v) in enumerate(zip(hist, d, strict=True)):
            if f"{feature}/{r}" in self._flagged:
                continue  # a flagged rank's long history is frozen, so it stays visible until it recovers
            if changed:
                # The others' reference now leaves out (or takes back) a rank: the deviations of the ranks in
                # line are measured against a new reference, so their histories start over.
                h.recent, h.long_sum, h.long_weight, h.prev = [], 0.0, 0.0, math.nan
                continue
            if h.n > 0 and math.isfinite(h.prev):
                h.diffs = [*h.diffs[-(NOISE_WINDOW - 1) :], abs(v - h.prev)]
            # The long history starts once the recent median is robust, and takes each step at most CLIP noise
            # units from that median (Huber-style): a one-batch outlier barely moves it, a lasting change does.
            if len(h.recent) == c.short_window:
                centre = h.short
                kept = centre + max(-CLIP * sigma, min(CLIP * sigma, v - centre))
                h.long_sum = (1 - c.long_alpha) * h.long_sum + kept
                h.long_weight = (1 - c.long_alpha) * h.long_weight + 1
            h.prev = v
            h.n += 1
        return found

    def _finding(
        self,
        step: int,
        family: str,
        feature: str,
        names: tuple[str, ...],
        raw: list[float],
        rank: int,
        rule: str,
        score: float,
        h: _History,
    ) -> Finding:
        what = {
            "loss": "loss",
            "grad_norm": "gradient norm (before averaging)",
            "disagreement": "disagreement with the other ranks' gradients (1 − cosine)",
        }[feature]
        others = median([v for i, v in enumerate(raw) if i != rank])
        if rule == "onset":
            cause = (
                f"Rank {rank}'s {what} moved away from the other ranks' over the last steps ({raw[rank]:.4g} "
                f"against {others:.4g}), having been in line before: its data shard or its device changed "
                "(a bad shard, corrupt samples, a faulty worker)."
            )
        else:
            cause = (
                f"Rank {rank}'s {what} has stayed above the other ranks' over its whole history ({raw[rank]:.4g} "
                f"against {others:.4g} now): its data shard or its device differs from the others' (a bad "
                "shard, a faulty worker)."
            )
        return Finding(
            step=step,
            kind="rank_outlier",
            severity="warning",
            signal=family + names[rank],
            value=raw[rank],
            baseline=others,
            evidence={
                "rank": rank,
                "feature": feature,
                "rule": rule,
                "score": score,
                "short": h.short,
                "long": h.long,
                "values": list(raw),
            },
            cause=cause,
            advice=(
                f"Inspect rank {rank}'s data shard (files, preprocessing, labels) and its device (memory errors, "
                "throttling); exclude the shard or the node. The long/short gradient-history idea is MUD-HoG's "
                "(Gupta et al. 2022, malicious and unreliable clients in federated learning)."
            ),
        )

    def _faults(self, obs: Observation) -> list[Finding]:
        found: list[Finding] = []
        for family in FAULT_FAMILIES:
            names, values = obs.per_param.get(family, ((), []))
            bad = [r for r, v in enumerate(values) if not math.isfinite(v)]
            if bad and len(bad) < len(values):
                found.append(
                    Finding(
                        step=obs.step,
                        kind="rank_outlier",
                        severity="warning",
                        signal=family + names[bad[0]],
                        value=values[bad[0]],
                        evidence={"rank": bad[0], "ranks": bad, "rule": "non_finite", "values": list(values)},
                        cause=f"Rank(s) {', '.join(map(str, bad))} had a non-finite {family.rstrip('/')} at this step "
                        "while the others did not: a fault on that worker or in its data, not in the model.",
                        advice="Every rank skipped this update together. If it repeats on the same rank, inspect "
                        "that rank's data shard and device.",
                    )
                )
                return found
        names, values = obs.per_param.get(keys.RANK_GRAD_NORM_PER_RANK, ((), []))
        if self.config.replicated and len(values) >= 2 and all(math.isfinite(v) for v in values):
            centre = median(values)
            tolerance = self.config.replica_rtol * max(abs(centre), 1e-30)
            odd = [r for r, v in enumerate(values) if abs(v - centre) > tolerance]
            if odd:
                named = odd if len(values) >= 3 and len(odd) < len(values) / 2 else []
                found.append(
                    Finding(
                        step=obs.step,
                        kind="rank_outlier",
                        severity="warning",
                        signal=keys.RANK_GRAD_NORM_PER_RANK,
                        value=max(values),
                        baseline=centre,
                        evidence={
                            "rank": named[0] if named else None,
                            "ranks": named,
                            "rule": "replica_mismatch",
                            "values": list(values),
                        },
                        cause="The averaged gradient norms differ between replicas that should hold identical gradients"
                        + (
                            f" (rank(s) {', '.join(map(str, named))} differ from the others)"
                            if named
                            else " (with two ranks keel cannot tell which one is wrong)"
                        )
                        + ": silent data corruption in a gradient buffer or the collective.",
                        advice="Check the devices and interconnect of the named rank(s); "
                        "the replicas are drifting apart.",
                    )
                )
        return found

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "hist": {k: [asdict(h) for h in v] for k, v in self._hist.items()},
            "flagged": dict(self._flagged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._hist = {k: [_History(**h) for h in v] for k, v in state["hist"].items()}
        self._flagged = dict(state["flagged"])


def _clamp(x: float, limit: float) -> float:
    return max(-limit, min(limit, x))
