"""Synthetic preference/RL signal series: healthy runs with their own nuisances, and each pathology with a known onset.

Seeded, a few hundred steps, every key a detector reads. Shapes follow what the runs report: DPO's margin rising while
the chosen log-probability stays put (healthy) or falls (Razin et al.); GRPO entropy keeping a third or more of its
start (DAPO's clip-higher runs) or collapsing; TRL's KL starting at 0 and levelling off; clip shares that are 0 by
construction with ``num_iterations=1``; zero-std group shares of 0.3–0.7 with binary rewards.
"""

from __future__ import annotations

import math

import numpy as np

from keel._core import keys
from keel._core.observation import Observation

N = 500


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _obs(columns: dict[str, np.ndarray], every: int = 1) -> list[Observation]:
    n = len(next(iter(columns.values())))
    return [Observation(step=every * i, values={k: float(v[i]) for k, v in columns.items()}) for i in range(n)]


# --- DPO -----------------------------------------------------------------------------------------------------------
def dpo(seed: int, *, fall_from: int | None = None, fall_rate: float = 0.004, n: int = N) -> list[Observation]:
    """Per-token chosen displacement (fresh reference: 0 at the start), its DPO reward, the per-token and summed chosen
    log-probs, and a margin rising to ~0.5 — healthy (the chosen drifts up a little), or falling ``fall_rate`` nats per
    token per step from ``fall_from``."""
    rng, t = _rng(seed), np.arange(n)
    drift = 0.03 * (1 - np.exp(-t / 100))
    if fall_from is not None:
        drift = drift - fall_rate * np.maximum(0, t - fall_from)
    displacement = drift + 0.02 * rng.standard_normal(n)
    margin = 0.5 * (1 - np.exp(-t / 150)) + 0.05 * rng.standard_normal(n)
    return _obs(
        {
            keys.PREF_CHOSEN_DISPLACEMENT: displacement,
            keys.PREF_CHOSEN_REWARD: 0.1 * 20 * displacement,  # β = 0.1, a 20-token response
            keys.PREF_CHOSEN_LOGP_TOKEN: -1.5 + displacement,
            keys.PREF_CHOSEN_LOGP: 20 * (-1.5 + displacement),
            keys.PREF_MARGIN: margin,
        }
    )


# --- GRPO entropy ----------------------------------------------------------------------------------------------------
def entropy(seed: int, *, collapse_from: int | None = None, rate: float = 0.985, n: int = N) -> list[Observation]:
    """Token entropy starting at 2.0 nats: healthy falls to ~0.9 (45 %) with 5 % noise; a collapse decays ×``rate``
    per step from ``collapse_from``."""
    rng, t = _rng(seed), np.arange(n)
    level = 0.9 + 1.1 * np.exp(-t / 150)
    if collapse_from is not None:
        level = level * rate ** np.maximum(0, t - collapse_from)
    return _obs({keys.RL_ENTROPY: level * np.exp(0.05 * rng.standard_normal(n))})


# --- KL to the reference ---------------------------------------------------------------------------------------------
def kl(seed: int, *, blow_from: int | None = None, n: int = N) -> list[Observation]:
    """k3 KL: 0 at the first step, rising to a ~0.03-nat plateau, ×e^(±0.3) noise with a few ×2.5 one-step outliers;
    a blow-up grows ×1.1 per step from ``blow_from`` until it overflows."""
    rng, t = _rng(seed), np.arange(n)
    level = 0.03 * (1 - np.exp(-t / 60)) * np.exp(0.3 * rng.standard_normal(n))
    level[rng.integers(50, n, 4)] *= 2.5
    if blow_from is not None:
        level = level * np.where(t >= blow_from, 1.1 ** np.maximum(0, t - blow_from), 1.0)
        with np.errstate(over="ignore"):
            level[t >= blow_from + 150] = math.inf
    return _obs({keys.RL_KL: level})


# --- Proxy reward, ensemble disagreement, gold reward ----------------------------------------------------------------
def rewards(
    seed: int, *, spread_from: int | None = None, gold_peak: int | None = None, n: int = N
) -> list[Observation]:
    """Proxy reward rising (log-like), the ensemble's disagreement near 0.2 (drifting up 20 % over the run), a gold
    reward rising with the proxy. Over-optimisation: disagreement grows linearly to 4× from ``spread_from``, and
    the gold reward peaks at ``gold_peak`` and falls."""
    rng, t = _rng(seed), np.arange(n)
    proxy = 2.0 * np.log1p(t / 50) + 0.1 * rng.standard_normal(n)
    spread = 0.2 * (1 + 0.2 * t / n)
    if spread_from is not None:
        spread = spread + 0.6 * np.maximum(0, t - spread_from) / (n - spread_from)
    gold = 1.0 * np.log1p(t / 80)
    if gold_peak is not None:
        gold = np.where(t <= gold_peak, gold, gold[gold_peak] - 0.006 * (t - gold_peak))
    return _obs(
        {
            keys.RL_REWARD_MEAN: proxy,
            keys.RM_MEAN: proxy,
            keys.RM_DISAGREEMENT: spread * np.exp(0.1 * rng.standard_normal(n)),
            keys.RL_GOLD_REWARD: gold + 0.08 * rng.standard_normal(n),
        }
    )


# --- Response lengths ------------------------------------------------------------------------------------------------
def lengths(seed: int, *, explode_from: int | None = None, limit: int = 1024, n: int = N) -> list[Observation]:
    """Mean length rising slowly 200 → ~320 tokens with 5 % noise, ~1 % truncated; an explosion grows 4 tokens a step
    from ``explode_from`` until responses pile up at the limit."""
    rng, t = _rng(seed), np.arange(n)
    mean = 200 + 120 * t / n
    if explode_from is not None:
        mean = mean + 4.0 * np.maximum(0, t - explode_from)
    mean = np.minimum(mean * np.exp(0.05 * rng.standard_normal(n)), limit)
    cut = np.clip(0.01 + (mean - 0.6 * limit) / (0.4 * limit), 0, 1) * (1 + 0.1 * rng.standard_normal(n))
    cut = np.clip(cut + 0.005 * rng.random(n), 0, 1)
    longest = np.minimum(limit, 2.5 * mean)
    return _obs({keys.RL_LENGTH_MEAN: mean, keys.RL_TRUNCATED: cut, keys.RL_LENGTH_MAX: longest})


# --- Clip shares ---------------------------------------------------------------------------------------------------
def clips(seed: int, *, one_pass: bool = False, climb_from: int | None = None, n: int = N) -> list[Observation]:
    """Clip shares: exactly 0 with one pass per batch, else low ~0.02 and high ~0.05 with noise; saturation climbs
    the high side by 0.002 a step from ``climb_from``."""
    rng, t = _rng(seed), np.arange(n)
    if one_pass:
        return _obs({keys.RL_CLIP_LOW: np.zeros(n), keys.RL_CLIP_HIGH: np.zeros(n)})
    low = np.clip(0.02 + 0.008 * rng.standard_normal(n), 0, 1)
    high = np.clip(0.05 + 0.015 * rng.standard_normal(n), 0, 1)
    if climb_from is not None:
        high = np.clip(high + 0.002 * np.maximum(0, t - climb_from), 0, 1)
    return _obs({keys.RL_CLIP_LOW: low, keys.RL_CLIP_HIGH: high})


# --- Uniform-reward groups -------------------------------------------------------------------------------------------
def groups(seed: int, *, dead_from: int | None = None, truncated: float = 0.02, n: int = N) -> list[Observation]:
    """Share of 64 prompt groups with uniform rewards: p 0.35 → 0.7 over the run (the model masters easy prompts),
    binomial noise; from ``dead_from`` every group is uniform. ``truncated`` is the truncated share (noisy)."""
    rng, t = _rng(seed), np.arange(n)
    p = 0.35 + 0.35 * t / n
    if dead_from is not None:
        p = np.where(t >= dead_from, 1.0, p)
    share = rng.binomial(64, p) / 64
    cut = np.clip(truncated + 0.01 * rng.standard_normal(n), 0, 1)
    reward = 0.3 + 0.4 * t / n + 0.05 * rng.standard_normal(n)  # the mean reward, rising as prompts are mastered
    return _obs({keys.RL_ZERO_STD_GROUPS: share, keys.RL_TRUNCATED: cut, keys.RL_REWARD_MEAN: reward})


def feed(det, observations: list[Observation]) -> list:
    return [f for o in observations for f in det.update(o)]
