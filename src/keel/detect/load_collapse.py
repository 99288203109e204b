"""Load-collapse detector: a mixture-of-experts router sending most tokens to a few experts, and staying there.

Reads ``moe/load_imbalance`` (`keel.signals.router`: the worst router's max/mean tokens per expert), silent without
it; also ``moe/gate_entropy`` (the lowest router's mean routing entropy ÷ log E) and ``moe/experts`` / ``moe/top_k``
(E and k). The imbalance is 1 for a balanced router and E/k when every token goes to the same k experts, so it is
judged as a share of the way to that ceiling: share = (imbalance − 1) / (E/k − 1). No absolute level would do: on
keel's proxy MoE a healthy top-1 router over 8 experts sits at imbalance 2.2–3.2 (share 0.2–0.3), a collapsed top-2
router over 4 experts at 1.8–2.0 (share 0.8–1). Without E and k (nor ``ceiling`` in the config) the detector assumes
a ceiling of ``assumed_ceiling`` and says so in the finding. The level is the median of the last ``window``
measurements.

Every router starts unbalanced: at initialisation its logits are near 0 and nearly alike for all tokens, so most
tokens pick the same experts while its probabilities are still almost uniform (gate entropy ≈ 0.99). A healthy
router then re-balances — but some sit fully collapsed first: keel's proxy, 4 experts top-2 with the balancing loss,
held the median share ≥ 0.9 for up to 24 measurements (steps ~20–45) on one of 17 healthy runs, its gate entropy
never below 0.951 meanwhile. Routers that are collapsing for good either hold it longer or grow sure of the
collapsed choice: without the balancing loss the gate entropy had fallen to 0.83–0.94 by the 10th–15th full
measurement. Hence:

- **warning** before the warm-up: a full collapse (share ≥ ``critical_share``, median of ``window``), not
  re-balancing, held for ``early_patience`` measurements, or for ``patience`` once the gate entropy's median is at or
  below ``settling_entropy`` (the router settling into it);
- **warning** after ``warmup`` measurements: the share is at least ``warn_share`` for ``patience`` measurements in
  a row, unless it is re-balancing — falling fast enough to be below ``warn_share`` within ``window`` steps. While
  it rises, the finding projects the step at which it would reach ``critical_share`` (``projected_critical_step``);
- **critical**: such a share that is locked in — the gate entropy's median has fallen to ``entropy_floor`` or below:
  the router is sure of its unbalanced choice, its softmax saturated, so the balancing gradient no longer moves it
  (no warm-up needed: a router at init is unbalanced but unsure) after the gate's median was above that floor at
  some measurement — a router locked from its first measurement (Hugging Face's Switch Transformers init,
  classifier std 1.0, gives gate entropy 0.01 at step 0) is the init's doing, every snapshot holds it, and it stays
  a warning with ``locked_since_start`` in its evidence, also while it unlocks (Switch's router under keel's
  ``router_z_loss`` climbed from 0.1 to ~0.27, one measurement at 0.32, which alone made it critical before session
  14). Nothing else: a full collapse with an unsure router (entropy above the floor) stays a warning however long it
  lasts. Critical is what a policy acts on, and
  ``policy="recover"`` rolls back and cuts the LR: that undoes a lock-in the LR caused, but a router that was
  unbalanced from initialisation is unbalanced in every snapshot, and a lower LR only slows its re-balancing. A tiny
  Hugging Face Mixtral / Qwen3-MoE on text with Hugging Face's default balancing weight (0.001) sits at share
  0.9–0.95 with gate entropy 0.92–0.97 at a healthy loss; when that was critical after the warm-up, ``recover``
  rolled it back to step 0 at step 99 and again at 199 (LR × 0.01) and its loss ended at 4.35 against 2.37.

On the proxy's runs without the balancing loss (8 experts top-1, 4 top-2; 5 + 4 runs) the early rule names the
collapse at steps 28–48 and 34–60, where the warm-up alone named it at 99–126 (BENCHMARKS.md, issue 19).

The gate entropy is folded in here rather than watched alone: a low routing entropy with a balanced load is a
confident router, not a failure (each token is sure of its expert, the experts share the tokens); it is a failure
when it freezes an unbalanced load. The finding names the router with the largest imbalance when the step stored
the per-router family. An episode ends when the share falls below ``warn_share`` − ``hysteresis``.

References:
    Fedus et al. 2021, Switch Transformers, arXiv 2101.03961 (load-balancing loss); Shazeer et al. 2017,
    arXiv 1701.06538 (the self-reinforcing imbalance); Wang et al. 2024, arXiv 2408.15664 (aux-loss-free balancing);
    OLMo-core ``nn/moe/router.py`` ("load imbalance" = max/mean); pytorch/torchtitan#1246 (router collapse).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from keel._core import keys
from keel._core.finding import Finding, Severity
from keel._core.observation import Observation
from keel._core.validate import check_types, config_from, require_ints, require_positive
from keel.detect._drift import project
from keel.detect._episode import Episode
from keel.detect._finding import explained_finding
from keel.detect._worst_member import worst_member
from keel.detect.detector import DETECTORS
from keel.detect.trend import TrendWindow

KIND = "load_collapse"


@dataclass(kw_only=True)
class LoadCollapseConfig:
    """Settings of the load-collapse detector.

    Attributes:
        window: Measurements in the level (median) and the slope.
        warmup: Measurements before an unbalanced but unsure router (gate entropy above the floor) is judged.
        warn_share: Share of the way from balanced (1) to collapsed (E/k) that, held and not re-balancing, warns.
        critical_share: Share of a full collapse (warns before the warm-up; the projected-critical step aims at it).
        entropy_floor: Gate entropy (÷ log E) at or below which an unbalanced router is locked in: critical.
        settling_entropy: Gate entropy at or below which a full collapse before the warm-up warns after ``patience``.
        early_patience: Consecutive full-collapse measurements that warn before the warm-up without a settling gate.
        patience: Consecutive qualifying measurements before a finding.
        hysteresis: How far below ``warn_share`` the share must fall to end the episode.
        ceiling: E/k when known to the user; None reads ``moe/experts`` and ``moe/top_k``.
        assumed_ceiling: E/k assumed when neither the config nor the probe gives it.
    """

    window: int = 20
    warmup: int = 100
    warn_share: float = 0.5
    critical_share: float = 0.9
    entropy_floor: float = 0.3
    settling_entropy: float = 0.94
    early_patience: int = 40
    patience: int = 10
    hysteresis: float = 0.05
    ceiling: float | None = None
    assumed_ceiling: float = 8.0

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "patience", "early_patience")
        require_ints(self, "window", minimum=3)
        require_ints(self, "warmup", minimum=0)
        require_positive(self, "entropy_floor", "hysteresis")
        if not 0 < self.warn_share <= self.critical_share <= 1 or self.entropy_floor >= 1:
            raise ValueError(
                f"LoadCollapseConfig.warn_share={self.warn_share!r}, critical_share={self.critical_share!r}, "
                f"entropy_floor={self.entropy_floor!r}; allowed: 0 < warn_share <= critical_share <= 1, "
                "0 < entropy_floor < 1"
            )
        for name in ("ceiling", "assumed_ceiling"):
            value = getattr(self, name)
            if value is not None and not 1 < value < math.inf:
                raise ValueError(f"LoadCollapseConfig.{name}={value!r}; allowed: E/k, a finite number > 1")


@DETECTORS.register("load_collapse")
class LoadCollapseDetector:
    """Flags a router whose load stays unbalanced (most tokens on a few experts), critical once it is locked in.

    Example:
        >>> from keel._core import Observation, keys
        >>> det = LoadCollapseDetector()
        >>> imbalance = [2.0] * 40 + [1.3] * 80 + [1.3 + 0.02 * s for s in range(30)] + [1.9] * 30  # drifts back
        >>> entropy = [0.98] * 140 + [max(0.98 - 0.05 * s, 0.05) for s in range(40)]  # ... and the router locks in
        >>> [(f.step, f.severity) for s, (i, e) in enumerate(zip(imbalance, entropy)) for f in det.update(
        ...     Observation(step=s, values={keys.MOE_LOAD_IMBALANCE: i, keys.MOE_GATE_ENTROPY: e,
        ...                                 keys.MOE_EXPERTS: 4.0, keys.MOE_TOP_K: 2.0}))]
        [(149, 'warning'), (164, 'critical')]
    """

    name = "load_collapse"
    # `keel.detect.scan.ReadsKeys`: the entropy, E and k are read once an imbalance wakes it
    reads = (keys.MOE_LOAD_IMBALANCE,)
    rests_when_finite = False

    def __init__(self, config: LoadCollapseConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, LoadCollapseConfig, config, fields)
        self._load = TrendWindow(self.config.window)
        self._entropy = TrendWindow(self.config.window)
        self._seen = 0  # finite imbalance measurements so far (the warm-up counts them)
        self._ceiling = math.nan  # E/k as the probe last gave it
        self._unsure_seen = False  # a gate entropy above the floor seen: a later lock-in happened in training
        self._episode = Episode()

    @property
    def ceiling(self) -> float:
        """E/k: the config's, else the probe's, else ``assumed_ceiling``."""
        cfg = self.config
        if cfg.ceiling is not None:
            return cfg.ceiling
        return self._ceiling if self._ceiling > 1 else cfg.assumed_ceiling

    def update(self, obs: Observation) -> list[Finding]:
        cfg = self.config
        x = obs.values.get(keys.MOE_LOAD_IMBALANCE)
        if x is None or not self._load.add(obs.step, x):
            return []
        self._seen += 1
        entropy = obs.values.get(keys.MOE_GATE_ENTROPY)
        if entropy is not None and self._entropy.add(obs.step, entropy):
            # unsure as the lock-in is judged: on the median (one noisy measurement is not a state)
            self._unsure_seen = self._unsure_seen or self._entropy.median() > self.config.entropy_floor
        experts, top_k = obs.values.get(keys.MOE_EXPERTS), obs.values.get(keys.MOE_TOP_K)
        if experts is not None and top_k is not None and top_k > 0 and math.isfinite(experts / top_k):
            self._ceiling = experts / top_k
        if len(self._load.points) < cfg.window:
            return []
        span = self.ceiling - 1
        share, slope = (self._load.median() - 1) / span, self._load.slope() / span
        if share < cfg.warn_share - cfg.hysteresis:
            self._episode.close()
            return []
        gate = self._entropy.median() if self._entropy.points else math.nan
        locked = gate <= cfg.entropy_floor  # False for NaN: no entropy logged, no lock-in claimed
        rebalancing = slope < 0 and (share - cfg.warn_share) / -slope < cfg.window
        warmed = self._seen >= cfg.warmup
        full = share >= cfg.critical_share
        if share < cfg.warn_share or rebalancing or not (locked or warmed or full):
            self._episode.break_run()
            return []
        self._episode.qualify(onset=self._load.first_step())
        # before the warm-up only a full collapse counts: held long, or with the router settling into it
        settling = gate <= cfg.settling_entropy
        ready = self._episode.run >= (cfg.patience if locked or warmed or settling else cfg.early_patience)
        # a rollback can undo a lock-in that training made, not a router unbalanced or locked since its init
        critical = ready and locked and self._unsure_seen
        severity = self._episode.escalate(critical=critical, warning=ready)
        if severity is None:
            return []
        return [self._finding(obs, severity, x, share, slope, gate)]

    def _finding(
        self, obs: Observation, severity: Severity, x: float, share: float, slope: float, gate: float
    ) -> Finding:
        cfg = self.config
        level = self._load.median()
        evidence: dict[str, Any] = {
            "imbalance": round(level, 4),
            "ceiling": round(self.ceiling, 4),
            "share": round(share, 4),
            "share_per_step": round(slope, 6),
            "onset_step": self._episode.onset_or(obs.step),
        }
        if cfg.ceiling is None and not self._ceiling > 1:
            evidence["ceiling_assumed"] = True  # the probe gave no moe/experts, moe/top_k
        if math.isfinite(gate):
            evidence["gate_entropy"] = round(gate, 4)
        if gate <= cfg.entropy_floor and not self._unsure_seen:
            evidence["locked_since_start"] = True  # e.g. a router initialised at too large a scale
        if slope > 0 and share < cfg.critical_share:
            project(evidence, obs.step, (cfg.critical_share - share) / slope)
        router = worst_member(obs, keys.MOE_LOAD_IMBALANCE_PER_LAYER)
        if router is not None:
            evidence["router"] = router
        where = f"{router}: " if router is not None else ""
        if gate <= cfg.entropy_floor:
            state = f"and the gate entropy is {gate:.2f} of its maximum: the router is sure of this choice"
        elif gate <= cfg.settling_entropy:
            state = f"and the gate entropy has fallen to {gate:.2f} of its maximum: the router is settling into it"
        else:
            state = "still rising" if slope > 0 else "not re-balancing"
        text = (
            f"{where}the busiest expert gets {level:.2f}× its fair share of tokens (max/mean load, median of "
            f"{cfg.window} measurements; {share:.0%} of the way to the {self.ceiling:.3g} of a full collapse), {state}."
        )
        return explained_finding(
            step=obs.step,
            kind=KIND,
            severity=severity,
            signal=keys.MOE_LOAD_IMBALANCE,
            value=x,
            baseline=1.0,  # a balanced router
            evidence=evidence,
            text=text,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "load": self._load.state_dict(),
            "entropy": self._entropy.state_dict(),
            "seen": self._seen,
            "ceiling": self._ceiling,
            "unsure_seen": self._unsure_seen,
            **self._episode.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.config = LoadCollapseConfig(**state["config"])
        self._load.load_state_dict(state["load"])
        self._entropy.load_state_dict(state["entropy"])
        self._seen = int(state["seen"])
        self._ceiling = float(state["ceiling"])
        self._unsure_seen = bool(state.get("unsure_seen", True))  # older snapshots: the old rule (lock-in critical)
        self._episode.load_state_dict(state)
