"""Evaluation stability (BOSE): can an eval rank a run's checkpoints, and does it follow training?

An eval that is to choose a checkpoint must order the checkpoints the same way when its examples are redrawn;
BOSE (Yang et al., "BOSE: A Systematic Evaluation Method Optimized for Base Models", ACL Findings 2025,
arXiv 2503.00812) measures this with Kendall's τ and finds early-training evals of base models too noisy to rank
checkpoints. Two numbers per eval, both Kendall's τ-b (`keel._core.rank_correlation.kendall_tau_b`, ties handled):

- **monotonicity**: τ-b between checkpoint order and the eval's values, sign turned so that +1 means "improves at
  every checkpoint" for the eval's goal (``"max"``: accuracy; ``"min"``: loss, perplexity). BOSE's "stability".
  A low value says the eval does not move with training — noise, or a real turn (over-fitting, forgetting).
- **rank τ**: from per-example scores (checkpoints × examples), the checkpoints are ranked by their mean score on
  the full set and on ``resamples`` bootstrap resamples of the examples (the same draw for every checkpoint:
  paired, as the checkpoints are scored on the same examples); rank τ is the mean τ-b between each bootstrap
  ranking and the full-data ranking, with its spread (standard deviation). It separates the two readings above:
  a low monotonicity with a high rank τ is a real turn; both low is an eval too noisy to rank these checkpoints.
  Examples with a non-finite score at any kept checkpoint are left out (every checkpoint must see the same set).

`NOISY_RANK_TAU` (in `keel._core.rank_correlation`, where the report reads it too) is the line drawn between the
two; its comment gives the reason. The functions are pure (NumPy, no torch); the
`EvalStability` tracker keeps the recent checkpoints' per-example scores of each eval and returns the signals to
record after each eval round (`keys.EVAL_RANK_TAU_PER_EVAL` and `keys.EVAL_MONOTONICITY_PER_EVAL`, each followed by
the eval's key after ``eval/``).

Example:
    >>> tracker = EvalStability()
    >>> for step, shift in enumerate([0.0, 0.1, 0.2]):
    ...     signals = tracker.observe("mc", step, [0.1 + shift, 0.5 + shift, 0.9 + shift])
    >>> signals["eval_stability/monotonicity/mc"]
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from keel._core import keys
from keel._core.rank_correlation import NOISE_FLOOR_RANK_TAU, NOISY_RANK_TAU, kendall_tau_b
from keel._core.validate import check_types, config_from, require_ints

Goal = Literal["max", "min"]


def monotonicity(values: Sequence[float], *, goal: Goal = "max") -> float:
    """Kendall τ-b of checkpoint order vs an eval's values, +1 when every checkpoint improves on the last.

    Args:
        values: The eval's value at each checkpoint, in training order.
        goal: ``"max"`` when higher is better (accuracy), ``"min"`` when lower is (loss, perplexity).

    Returns:
        τ-b in [−1, 1]; NaN with fewer than 2 values, a NaN value, or all values equal.

    Raises:
        ValueError: ``goal`` is neither ``"max"`` nor ``"min"``.
    """
    if goal not in ("max", "min"):
        raise ValueError(f"monotonicity: goal={goal!r}; allowed: 'max' or 'min'")
    tau = kendall_tau_b(range(len(values)), values)
    return tau if goal == "max" else -tau


@dataclass(frozen=True, kw_only=True)
class RankStability:
    """How steadily per-example scores rank checkpoints under bootstrap resampling of the examples.

    Attributes:
        tau_mean: Mean τ-b between each bootstrap ranking and the full-data ranking (NaN when undefined).
        tau_std: Their standard deviation (population).
        checkpoints: Checkpoints ranked.
        examples: Examples used (those with a finite score at every checkpoint).
        resamples: Bootstrap resamples drawn.
    """

    tau_mean: float
    tau_std: float
    checkpoints: int
    examples: int
    resamples: int


def rank_stability(
    scores: Sequence[Sequence[float]] | np.ndarray, *, resamples: int = 200, seed: int = 0
) -> RankStability:
    """Rank τ of checkpoints under a paired bootstrap of per-example scores.

    Args:
        scores: checkpoints × examples; row c holds every example's score at checkpoint c.
        resamples: Bootstrap resamples (each draws as many examples as there are, with replacement).
        seed: Seed of the resampling (the same seed gives the same answer).

    Returns:
        A `RankStability`; ``tau_mean`` is NaN with fewer than 2 checkpoints or usable examples, or when the full
        data ties every checkpoint.

    Raises:
        ValueError: ``scores`` is not a 2-d table of numbers, or ``resamples`` < 1.
    """
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"rank_stability: scores of shape {table.shape}; allowed: checkpoints × examples (2-d)")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"rank_stability: resamples={resamples!r}; allowed: an int >= 1")
    table = table[:, np.isfinite(table).all(axis=0)]
    checkpoints, examples = table.shape
    if checkpoints < 2 or examples < 1:
        return RankStability(
            tau_mean=math.nan, tau_std=math.nan, checkpoints=checkpoints, examples=examples, resamples=resamples
        )
    full = table.mean(axis=1).tolist()
    rng = np.random.default_rng(seed)
    # counts[e, b]: how often resample b drew example e; one matmul gives every resample's checkpoint means
    draws = rng.integers(0, examples, size=(resamples, examples))
    flat = (draws + examples * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=examples * resamples).reshape(resamples, examples).T.astype(float)
    means = (table @ counts) / examples  # checkpoints × resamples
    taus = _taus_against(means, np.asarray(full))
    if np.isnan(taus).all():
        return RankStability(
            tau_mean=math.nan, tau_std=math.nan, checkpoints=checkpoints, examples=examples, resamples=resamples
        )
    # a resample that ties every checkpoint (tiny sets of 0/1 scores) orders nothing: it counts as no agreement
    taus = np.nan_to_num(taus, nan=0.0)
    return RankStability(
        tau_mean=float(taus.mean()),
        tau_std=float(taus.std()),
        checkpoints=checkpoints,
        examples=examples,
        resamples=resamples,
    )


def _taus_against(columns: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """τ-b of every column of ``columns`` (items × columns) against ``reference``, all at once: what
    `kendall_tau_b` gives column by column (NaN where a column or the reference ties every pair), without its
    Python loop over pairs — an eval round's 200 resamples of 32 checkpoints took ~50 ms that way, ~1 ms this."""
    upper = np.triu_indices(len(reference), 1)
    ref = np.sign(reference[:, None] - reference[None, :])[upper]  # pairs
    cols = np.sign(columns[:, None, :] - columns[None, :, :])[upper]  # pairs × columns
    denominator = np.sqrt(float(np.count_nonzero(ref)) * np.count_nonzero(cols, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ref[:, None] * cols).sum(axis=0) / denominator, np.nan)


@dataclass(kw_only=True)
class EvalStabilityConfig:
    """Settings of `EvalStability`.

    Attributes:
        resamples: Bootstrap resamples per eval round.
        seed: Seed of the resampling; each round draws from (seed, step), so a round's answer does not depend on
            how many rounds came before.
        max_checkpoints: The most recent checkpoints kept per eval (memory: this × examples floats; and the
            ranking is among these).
        min_checkpoints: Checkpoints needed before anything is recorded (τ of 2 items is ±1 only).
    """

    resamples: int = 200
    seed: int = 0
    max_checkpoints: int = 32
    min_checkpoints: int = 3

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "resamples", "max_checkpoints")
        require_ints(self, "seed", minimum=0)
        require_ints(self, "min_checkpoints", minimum=2)
        if self.min_checkpoints > self.max_checkpoints:
            raise ValueError(
                f"EvalStabilityConfig.min_checkpoints={self.min_checkpoints!r}; allowed: at most max_checkpoints "
                f"({self.max_checkpoints})"
            )


class EvalStability:
    """Keeps each eval's recent checkpoints and says, after each eval round, how stable the eval is.

    `keel.guard` hands it every eval's value (and, for an eval that returns a 1-d tensor, its per-example scores)
    through `observe`, and records what `observe` returns at the eval's step.

    Args:
        config: `EvalStabilityConfig`; default settings when None.
    """

    def __init__(self, config: EvalStabilityConfig | None = None) -> None:
        self.config = config_from(self, EvalStabilityConfig, config, {})
        self._values: dict[str, list[tuple[int, float]]] = {}
        self._scores: dict[str, list[tuple[int, np.ndarray]]] = {}

    def observe(
        self, name: str, step: int, scores: float | Sequence[float] | np.ndarray, *, goal: Goal = "max"
    ) -> dict[str, float]:
        """Add one checkpoint of eval ``name`` and return the signals to record at ``step``.

        Args:
            name: The eval's key after ``eval/`` (``"mc"`` for ``eval/mc``).
            step: The step the eval ran after; a step at or before the last one seen (a rollback) drops the kept
                checkpoints from that step on.
            scores: The eval's value, or its per-example scores (1-d; the value is their mean). A vector whose
                length differs from the kept ones starts this eval's per-example history over (a different set).
            goal: ``"max"`` or ``"min"`` (`monotonicity`).

        Returns:
            ``{EVAL_MONOTONICITY_PER_EVAL + name: τ}`` once ``min_checkpoints`` finite values are kept (over
            those), and
            ``{EVAL_RANK_TAU_PER_EVAL + name: τ}`` once as many per-example vectors are; only finite values.
        """
        vector = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(
                f"EvalStability.observe: scores of shape {vector.shape}; allowed: a number or a 1-d vector"
            )
        per_example = np.ndim(scores) == 1
        values, kept = self._values.setdefault(name, []), self._scores.setdefault(name, [])
        # a rollback: the checkpoints after the restored step are gone
        values[:] = [(s, v) for s, v in values if s < step]
        kept[:] = [(s, v) for s, v in kept if s < step]
        finite = vector[np.isfinite(vector)]
        values.append((step, float(finite.mean()) if finite.size else math.nan))
        if per_example:
            if kept and kept[-1][1].shape != vector.shape:
                kept.clear()
            kept.append((step, vector))
        del values[: -self.config.max_checkpoints]
        del kept[: -self.config.max_checkpoints]
        out: dict[str, float] = {}
        finite_values = [v for _, v in values if math.isfinite(v)]  # a NaN round must not block the next 31
        if len(finite_values) >= self.config.min_checkpoints:
            tau = monotonicity(finite_values, goal=goal)
            if math.isfinite(tau):
                out[keys.EVAL_MONOTONICITY_PER_EVAL + name] = tau
        if per_example and len(kept) >= self.config.min_checkpoints:
            seed = np.random.SeedSequence([self.config.seed, step]).generate_state(1)[0]
            rank = rank_stability(np.stack([v for _, v in kept]), resamples=self.config.resamples, seed=int(seed))
            if math.isfinite(rank.tau_mean):
                out[keys.EVAL_RANK_TAU_PER_EVAL + name] = rank.tau_mean
        return out

    def on_eval(self, result: Any) -> dict[str, float]:
        """`keel.guard.evaluation.EvalListener`: one eval result in, the signals to record at its step out.

        Read by duck typing (``detect`` does not import ``guard``): ``result.step``, ``result.spec.name``,
        ``result.spec.goal``, ``result.scores`` (a 1-d tensor or None), ``result.headline`` and ``result.values``.
        Per-example scores give both signals under the eval's name; otherwise the headline value gives the
        monotonicity under the headline key after ``eval/``.
        """
        goal = result.spec.goal
        if result.scores is not None:
            scores = np.asarray(result.scores.detach().double().cpu().numpy())
            return self.observe(result.spec.name, result.step, scores, goal=goal)
        value = result.values.get(result.headline)
        if value is None:
            return {}
        name = result.headline.removeprefix(keys.EVAL_PER_NAME)
        return self.observe(name, result.step, float(value), goal=goal)

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": {k: list(v) for k, v in self._values.items()},
            "scores": {k: [(s, v.tolist()) for s, v in kept] for k, kept in self._scores.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._values = {k: [(int(s), float(x)) for s, x in v] for k, v in state["values"].items()}
        self._scores = {
            k: [(int(s), np.asarray(v, dtype=np.float64)) for s, v in kept] for k, kept in state["scores"].items()
        }


__all__ = [
    "NOISE_FLOOR_RANK_TAU",
    "NOISY_RANK_TAU",
    "EvalStability",
    "EvalStabilityConfig",
    "RankStability",
    "monotonicity",
    "rank_stability",
]
