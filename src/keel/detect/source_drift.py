"""Source-drift detector: names the data source whose loss or gradient statistics moved away from the other sources'.

Reads, per source ``<s>`` of a batch (a data set, a domain, a shard): the loop's own loss of its examples every step
(``source/step_loss/<s>`` and ``source/step_count/<s>``, `keel.signals.source_losses` via ``guard.step(loss,
signals=...)``: no extra forward), pooled count-weighted over ``loss_block`` steps into one loss measurement; and what
`keel.signals.SourceGradientsProbe` measures on the step's batch every few steps: ``source/loss/<s>`` (judged only
where no step losses come), ``source/grad_norm/<s>``, ``source/grad_cos/<s>`` (as 0-d signals, or as families in
``Observation.per_param``). At each measurement every source's feature is measured against the source's own level
(a slowly forgetting mean) and then against the other sources' (the median of their excess over their own levels),
which removes what training does to all sources alike and does not depend on which sources a small batch holds:
ratios for the loss and the gradient norm (sources differ in scale and fall in proportion), differences for the
disagreement 1 − cosine. Of that deviation the detector keeps, per source and feature, a long history (a slowly
forgetting, Huber-clipped mean of the values that left the short window) and a short one (the median of the last
``short_window`` measurements) — MUD-HoG's long/short "histories of gradients" (Gupta et al. 2022), which separate
federated clients that are bad from the start from those that *became* bad; `keel.guard.rank_outlier` applies the
same idea to DDP ranks.

Sources are not ranks: a batch's sources differ by design (code is harder than prose), so a source that is off from
the first measurement is healthy here, and only the **onset** rule runs — a source is named when its short history
has moved ``z`` standard errors (of short − long) and ``min_effect`` step-to-step noise units away from its long one
for ``patience`` measurements in a row: in the worse direction for the gradients (a larger norm, a lower cosine),
either way for the loss (``TWO_SIDED``: a source turned to zero-filled windows is learnt at once and its loss
collapses; with two sources only a rise, as one falling is the other rising). The noise is each source's own — the
mean of the smaller three quarters of its recent step-to-step changes: the drift's own jump does not inflate it, and
quantised values (half the changes 0) do not make it vanish as a median would — because a source with few examples
per batch is noisier than a large one; the median short history means a one-batch outlier never counts. A named
source is left out of the others' reference and its level and long history freeze until it is back within one
standard error; the others' histories start over, as their reference changed. One ``warning`` of kind
``source_drift`` per source and episode, naming the features that drifted and their direction. With three or more
sources a source is named only while it is also off the median of every source, its own included, the same way
(``MAJORITY``): one source whose loss collapses (or soars) must not make the healthy ones look risen (or fallen).

Measured — synthetic (tests/detect/test_source_drift.py's ``series``: 2–6 heterogeneous sources, common decay, slow
differential drift, one-batch outliers, sources missing from 10 % of batches; 150 measurements each) and on the
proxy LM (batch 16 from three sources, one of them changed at step 300), every seed in `docs/data.md`. From one
batch's ~5 examples a source's loss is too noisy (σ ≈ 0.12 of its level) to name even bytes shuffled (+45 % against
the others; z 3.9 against the required 8); pooled over ten steps of the loop's own losses it is named 49 steps after
the change in 3 of 3 seeds, a collapse in 3 of 3, and no healthy or harder-from-the-start run names anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._deviation_history import DeviationHistory
from keel.detect._finding import explained_finding
from keel.detect.detector import DETECTORS
from keel.detect.robust import MEDIAN_SE, median

KIND = "source_drift"
# (family, feature): each feature turned into "higher is worse" by `_feature`
FEATURES: tuple[tuple[str, str], ...] = (
    (keys.SOURCE_LOSS_PER_SOURCE, "loss"),
    (keys.SOURCE_GRAD_NORM_PER_SOURCE, "grad_norm"),
    (keys.SOURCE_GRAD_COS_PER_SOURCE, "disagreement"),
)
WHAT = {"loss": "loss", "grad_norm": "per-example gradient norm", "disagreement": "disagreement (1 − cosine)"}
CLIP = 3.0  # the farthest from the recent median one measurement may pull the long history, in noise units
NOISE_WINDOW = 32  # step-to-step changes kept per source for its noise scale
KEEP = 0.75  # the noise scale averages the smallest three quarters of the recent step-to-step changes
# ... whose mean is this many σ for independent normal X, Y: √2 · 2(φ(0) − φ(q)) / 0.75, q = Φ⁻¹(0.875) = 1.1503
TRIMMED_ABS_DIFF = math.sqrt(2) * 2 * (1 - math.exp(-(1.1503**2) / 2)) / math.sqrt(2 * math.pi) / KEEP
# A source's own level forgets this many times more slowly than the long history, so a drift is not absorbed into the
# level it is measured against before the histories see it (a common decay cancels between sources at any speed).
LEVEL_SLOWER = 4
LEVEL_CLIP = 2.0  # a value moves a source's level as if it were at most this factor (ratios) ...
LEVEL_CLIP_DISAGREEMENT = 0.25  # ... or this far (the cosine's disagreement, 0 to 2) from it
# With three or more sources a source is named only while its deviation from every source's median, its own
# included, is at least this share of its deviation from the others': the others' median of two sources is their
# mean, and one source whose loss collapses (byte-0x00 windows on the proxy LM: 2.4 -> 0.0004) halves it, so both
# healthy sources "rose" against it; against all three's median they did not.
MAJORITY = 0.5
# A source's loss that falls away from the others' is named too: a source turned to constant bytes (zero-filled
# windows on the proxy LM: 2.4 -> 0.0004 within 50 steps) is learnt at once, and broken data that is trivially easy
# is as broken as data that is hard. Gradient norms and cosines stay one-sided: a source whose gradient shrinks or
# agrees more with the rest is being learnt.
TWO_SIDED = frozenset({"loss"})
MIN_SIGMA = 1e-3  # floor of the noise scale: a source measured identically each time is not infinitely sensitive


@dataclass(kw_only=True)
class SourceDriftConfig:
    """Settings of the source-drift detector.

    Attributes:
        warmup: Measurements of a source's history before it can be named (more than ``short_window``).
        short_window: Measurements in the short history (their median).
        long_alpha: Forgetting rate of the long history (0.05 ≈ the last twenty measurements).
        z: Standard errors of the short history by which it must exceed the long one.
        min_effect: Step-to-step noise units by which it must exceed it, too.
        patience: Consecutive measurements it must exceed it for (two outliers in one short window, in a source or
            its reference, can lift the median once; a drift lasts).
        loss_block: Steps of the loop's own per-source losses (``source/step_loss/<s>``, `keel.signals.
            source_losses`) pooled, count-weighted, into one loss measurement; while they come, the probe's
            ``source/loss/<s>`` (one batch's examples) is not judged.
    """

    warmup: int = 20
    short_window: int = 7
    long_alpha: float = 0.05
    z: float = 8.0
    min_effect: float = 2.0
    patience: int = 2
    loss_block: int = 10

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "warmup", "short_window", "patience", "loss_block")

        if self.warmup <= self.short_window:
            raise ValueError(f"SourceDriftConfig.warmup={self.warmup!r}; allowed: > short_window ({self.short_window})")
        require_positive(self, "z", "min_effect")
        if not 0 < self.long_alpha < 1:
            raise ValueError(f"SourceDriftConfig.long_alpha={self.long_alpha!r}; allowed: 0 < long_alpha < 1")


@dataclass
class _History(DeviationHistory):
    """One source's deviation in one feature: the shared histories, and how long its short one has risen."""

    risen: int = 0  # consecutive measurements with the short history beyond the long one, in one direction

    @property
    def sigma(self) -> float:
        if not self.diffs:
            return math.inf
        kept = sorted(self.diffs)[: max(1, math.ceil(KEEP * len(self.diffs)))]
        return max(sum(kept) / len(kept) / TRIMMED_ABS_DIFF, MIN_SIGMA)

    def restart(self) -> None:
        self.n, self.recent, self.long_sum, self.long_weight, self.prev, self.risen = 0, [], 0.0, 0.0, math.nan, 0

    def add(self, value: float, short_window: int, alpha: float) -> None:
        if math.isfinite(self.prev):
            self.diffs = [*self.diffs[-(NOISE_WINDOW - 1) :], abs(value - self.prev)]
        # The long history takes a value only when it leaves the short window, so the two never share one: a drift
        # fills the short window before the long history sees any of it (taking each value at once absorbed a third
        # of a drift by the time the short window held it: a shuffled source on the proxy LM peaked at z 3.9).
        # Each value is taken at most CLIP noise units from the long mean (the first from the recent median),
        # Huber-style: a one-batch outlier barely moves the long history, a lasting change does, slowly.
        if len(self.recent) == short_window and math.isfinite(self.sigma):
            leaving, limit = self.recent[0], CLIP * self.sigma
            centre = self.long if self.long_weight > 0 else self.short
            self.long_sum = (1 - alpha) * self.long_sum + centre + max(-limit, min(limit, leaving - centre))
            self.long_weight = (1 - alpha) * self.long_weight + 1
        self.recent = [*self.recent[-(short_window - 1) :], value]
        self.prev = value
        self.n += 1


def members(obs: Observation, family: str) -> dict[str, float]:
    """A family's values by member name, from ``per_param`` and from 0-d signals keyed ``<family><name>``.

    Example:
        >>> members(Observation(step=0, values={"source/loss/web": 2.0, "loss": 1.0}), "source/loss/")
        {'web': 2.0}
    """
    names, values = obs.per_param.get(family, ((), []))
    out = dict(zip(names, values, strict=True))
    out.update({k[len(family) :]: v for k, v in obs.values.items() if k.startswith(family) and len(k) > len(family)})
    return out


def _feature(feature: str, value: float) -> float:
    """The value on the scale deviations are taken in, "higher is worse"; NaN where it has none (log of ≤ 0)."""
    if feature == "disagreement":
        return 1.0 - value
    return value if value > 0 else math.nan


@DETECTORS.register("source_drift")
class SourceDriftDetector:
    """Names the data source whose loss, gradient norm or gradient direction drifted away from the other sources'.

    Example:
        >>> det, found = SourceDriftDetector(), []
        >>> for step in range(60):
        ...     bad = 2.0 if step >= 40 else 1.0
        ...     loss = {"web": 2.0 + 0.02 * (step % 3), "code": 1.0 + 0.01 * (step % 2)}
        ...     loss["math"] = bad + 0.01 * (step % 4)
        ...     found += det.update(Observation(step=step, values={f"source/loss/{s}": v for s, v in loss.items()}))
        >>> [(f.step, f.evidence["source"], f.evidence["features"]) for f in found]
        [(44, 'math', ['loss'])]
    """

    name = "source_drift"
    reads = (*(family for family, _ in FEATURES), keys.SOURCE_STEP_LOSS_PER_SOURCE, keys.SOURCE_STEP_COUNT_PER_SOURCE)
    rests_when_finite = False

    def __init__(self, config: SourceDriftConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, SourceDriftConfig, config, fields)
        self._hist: dict[str, dict[str, _History]] = {}  # feature → source → history
        self._flagged: dict[str, list[str]] = {}  # source → the features that drifted, while it stays named
        self._level: dict[str, dict[str, tuple[float, float]]] = {}  # feature → source → forgetting sum, weight
        self._majority: dict[str, float] = {}  # this feature's deviations from all sources' median (3 or more)
        self._pooling = False  # the loop passes its own per-step per-source losses (source/step_loss/<s>)
        self._block: dict[str, tuple[float, float]] = {}  # source → this block's loss × count, count
        self._block_steps = 0

    def update(self, obs: Observation) -> list[Finding]:
        c = self.config
        drifted: dict[str, list[str]] = {}
        raw: dict[str, dict[str, float]] = {}
        measured = {family: members(obs, family) for family, _ in FEATURES}
        pooled = self._pool(obs)
        if self._pooling:  # the loop's every-step losses replace the probe's one-batch loss
            measured[keys.SOURCE_LOSS_PER_SOURCE] = pooled or {}
        for family, feature in FEATURES:
            values = {s: v for s, v in measured[family].items() if math.isfinite(_feature(feature, v))}
            x = {s: _feature(feature, v) for s, v in values.items()}
            if len(x) < 2:
                continue
            raw[feature] = values
            hist = self._hist.setdefault(feature, {})
            for source, d in self._deviations(feature, x).items():
                if not math.isfinite(d):
                    continue  # an overflow of extreme values: no deviation to judge
                h = hist.setdefault(source, _History())
                if source in self._flagged:
                    # the long history freezes while named, so the drift stays visible until it is over
                    h.recent = [*h.recent[-(c.short_window - 1) :], d]
                    continue
                h.add(d, c.short_window, c.long_alpha)
                ready = h.n >= c.warmup and h.long_weight > 0
                way = self._moved(h, feature) if ready else 0  # +1 risen, -1 fallen (a loss only), 0 neither
                if way < 0 and source not in self._majority:
                    # of two sources, the one that fell is as much the other one risen: which moved takes a third
                    way = 0
                h.risen = h.risen + way if way and h.risen * way >= 0 else way
                if abs(h.risen) >= c.patience and self._majority.get(source, d) * way >= MAJORITY * d * way:
                    drifted.setdefault(source, []).append(feature)
        found = [self._finding(obs.step, s, f, raw) for s, f in drifted.items()]
        released = [s for s in self._flagged if all(self._back(f, s) for f in self._flagged[s])]
        for source in released:
            del self._flagged[source]
        self._flagged.update(drifted)
        if drifted or released:
            # the others' reference now leaves out (or takes back) a source: their deviations start over
            for hist in self._hist.values():
                for source, h in hist.items():
                    if source not in self._flagged:
                        h.restart()
        return found

    def _pool(self, obs: Observation) -> dict[str, float] | None:
        """Pools the loop's per-step losses of each source (count-weighted); their means once a block is full."""
        losses = members(obs, keys.SOURCE_STEP_LOSS_PER_SOURCE)
        if not losses:
            return None
        counts = members(obs, keys.SOURCE_STEP_COUNT_PER_SOURCE)
        self._pooling = True
        for source, value in losses.items():
            n = counts.get(source, 1.0)
            if math.isfinite(value) and math.isfinite(n) and n > 0:  # a non-finite loss is the loss detectors' case
                total, weight = self._block.get(source, (0.0, 0.0))
                self._block[source] = (total + value * n, weight + n)
        self._block_steps += 1
        if self._block_steps < self.config.loss_block:
            return None
        means = {source: total / weight for source, (total, weight) in self._block.items()}
        self._block, self._block_steps = {}, 0
        return means

    def _deviations(self, feature: str, x: dict[str, float]) -> dict[str, float]:
        """Each source's excess over its own level, beyond the other sources' excess over theirs (their median).

        Sources differ in level (code is harder than prose) and, as training goes on, their losses and gradients
        fall roughly in proportion. Measuring each against its own level (a slowly forgetting mean) and then
        against the others' removes both, and does not depend on which sources a small batch happens to hold:
        ratios for the loss and the gradient norm (``x / (level × the others' median ratio) − 1``), differences
        for the cosine's disagreement. Named sources are left out of the others' median while others remain.
        """
        levels = self._level.setdefault(feature, {})
        ratio = feature != "disagreement"
        rel = {}
        for source, v in x.items():
            level = levels[source][0] / levels[source][1] if source in levels else v
            rel[source] = _divide(v, level) if ratio else v - level
        out = {}
        unflagged = [u for s, u in rel.items() if s not in self._flagged]
        self._majority = {}
        for source, r in rel.items():
            others = [u for s, u in rel.items() if s != source and s not in self._flagged]
            common = median(others or [u for s, u in rel.items() if s != source])
            out[source] = _divide(r, common) - 1 if ratio else r - common
            if len(unflagged) >= 3:  # the deviation from every unflagged source's median, its own included
                everyone = median(unflagged)
                self._majority[source] = _divide(r, everyone) - 1 if ratio else r - everyone
        alpha = self.config.long_alpha / LEVEL_SLOWER
        for source, v in x.items():  # a named source's level freezes, so its excess stays visible
            if source not in self._flagged:
                total, weight = levels.get(source, (0.0, 0.0))
                if weight > 0:  # clipped, so a jump (a loss 25× its level) moves the level slowly, not by 25×/weight
                    level = total / weight
                    v = min(max(v, level / LEVEL_CLIP), level * LEVEL_CLIP) if ratio else level + _clamp(v - level)
                levels[source] = ((1 - alpha) * total + v, (1 - alpha) * weight + 1)
        return out

    def _short_se(self, h: _History) -> float:
        return h.sigma * MEDIAN_SE / math.sqrt(self.config.short_window)

    def _se(self, h: _History) -> float:
        """The standard error of short − long: the recent median's and the long mean's (a forgetting mean of
        ``long_weight`` values, at most (2 − α)/α effective ones)."""
        alpha = self.config.long_alpha
        long_se = h.sigma * max(math.sqrt(alpha / (2 - alpha)), 1 / math.sqrt(max(h.long_weight, 1.0)))
        return math.hypot(self._short_se(h), long_se)

    def _moved(self, h: _History, feature: str) -> int:
        """+1 where the short history rose beyond the long one by ``z`` standard errors and ``min_effect`` noise
        units, -1 where it fell so (a feature in ``TWO_SIDED`` only), else 0."""
        c, rise = self.config, h.short - h.long
        way = 1 if rise > 0 else -1
        if way < 0 and feature not in TWO_SIDED:
            return 0
        return way if abs(rise) > c.z * self._se(h) and abs(rise) > c.min_effect * h.sigma else 0

    def _back(self, feature: str, source: str) -> bool:
        h = self._hist.get(feature, {}).get(source)
        # hysteresis: named at z standard errors, released within one, so a marginal drift is one finding
        if h is None or not h.recent:
            return True
        rise = h.short - h.long
        return (abs(rise) if feature in TWO_SIDED else rise) < self._short_se(h)

    def _finding(self, step: int, source: str, features: list[str], raw: dict[str, dict[str, float]]) -> Finding:
        first = features[0]
        family = dict((f, fam) for fam, f in FEATURES)[first]
        values = raw[first]
        others = median([v for s, v in values.items() if s != source])
        hist = {f: self._hist[f][source] for f in features}
        text = (
            f"Source {source!r}'s {' and '.join(WHAT[f] for f in features)} moved away from the other sources' "
            f"over the last measurements ({WHAT[first]} {values[source]:.4g} against their {others:.4g}), having "
            "been in line with them before."
        )
        return explained_finding(
            step=step,
            kind=KIND,
            severity="warning",
            signal=family + source,
            value=values[source],
            baseline=others,
            evidence={
                "source": source,
                "features": list(features),
                "rule": "onset",
                "direction": {f: "up" if h.risen > 0 else "down" for f, h in hist.items()},
                "score": {f: (h.short - h.long) / self._se(h) for f, h in hist.items()},
                "short": {f: h.short for f, h in hist.items()},
                "long": {f: h.long for f, h in hist.items()},
                "values": {f: dict(raw[f]) for f in features},
            },
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "hist": {f: {s: asdict(h) for s, h in hist.items()} for f, hist in self._hist.items()},
            "flagged": {s: list(f) for s, f in self._flagged.items()},
            "level": {f: {s: list(v) for s, v in lv.items()} for f, lv in self._level.items()},
            "pooling": self._pooling,
            "block": {s: list(v) for s, v in self._block.items()},
            "block_steps": self._block_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = SourceDriftConfig(**state["config"])
        self._hist = {f: {s: _History(**h) for s, h in hist.items()} for f, hist in state["hist"].items()}
        self._flagged = {s: list(f) for s, f in state["flagged"].items()}
        self._level = {f: {s: (float(v[0]), float(v[1])) for s, v in lv.items()} for f, lv in state["level"].items()}
        self._pooling = bool(state.get("pooling", False))
        self._block = {s: (float(v[0]), float(v[1])) for s, v in state.get("block", {}).items()}
        self._block_steps = int(state.get("block_steps", 0))


def _clamp(x: float) -> float:
    return max(-LEVEL_CLIP_DISAGREEMENT, min(LEVEL_CLIP_DISAGREEMENT, x))


def _divide(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (denormal values' levels and ratios underflow): no deviation to judge then."""
    return a / b if b != 0 else math.nan
