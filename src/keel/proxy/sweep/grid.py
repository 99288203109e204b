"""The sweep grid: recipes × learning rates × proxy sizes × seeds, expanded into one `RunSpec` per run.

A sweep is a named grid over one `TrainConfig` (`SweepConfig.base`), not a recipe type of its own. The
defaults follow Wortsman et al. (2023): a log-spaced LR grid over [3e-4, 3e-1], AdamW β = (0.9, 0.95),
gradient clipping at global norm 1, linear warm-up then cosine decay to an LR of 1e-5 whatever the peak LR,
on three proxy sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel._core.argtypes import INT64_MAX
from keel._core.validate import check_types
from keel.proxy.model import list_proxy_sizes
from keel.proxy.sweep.recipes import DEFAULT_RECIPES, Recipe, resolve_recipe
from keel.proxy.trainer import TrainConfig


def default_lrs(low: float = 3e-4, high: float = 3e-1, per_decade: int = 2) -> list[float]:
    """A log-spaced LR grid from ``low`` to ``high`` with ``per_decade`` points per decade.

    The default is the paper's range at half-decade spacing: 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1
    (points within 7 % of the 1-3 series are written as the paper writes them: 9.49e-4 as 1e-3).

    Example:
        >>> default_lrs()
        [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]
    """
    if not (0 < low < high) or per_decade < 1:
        raise ValueError(
            f"default_lrs(low={low}, high={high}, per_decade={per_decade}); allowed: 0 < low < high, per_decade >= 1"
        )
    n = round(math.log10(high / low) * per_decade)
    return [_round_lr(low * (high / low) ** (i / n)) for i in range(n + 1)]


def _round_lr(lr: float) -> float:
    # Half-decade steps from 3e-4 land on 9.49e-4, 3.0e-3, 9.49e-3 ...; the paper (and anyone typing the grid)
    # writes 1e-3, 3e-3, 1e-2: snap to the 1-3 series within 0.03 decades (7 %), else keep 2 digits.
    exponent = math.floor(math.log10(lr))
    mantissa = lr / 10**exponent
    for nice in (1.0, 3.0, 10.0):
        if abs(math.log10(mantissa / nice)) < 0.03:
            return float(f"{nice:g}e{exponent}")
    return float(f"{mantissa:.2g}e{exponent}")


def default_base() -> TrainConfig:
    """The run settings of Wortsman et al.'s sweeps: `TrainConfig`'s defaults, clipped at global norm 1."""
    return TrainConfig(max_grad_norm=1.0)


# The settings each grid point sets on the base before its recipe runs: described by the grid, not the base.
GRID_FIELDS = ("size", "lr", "seed", "min_lr_ratio")


@dataclass(kw_only=True)
class SweepConfig:
    """A named grid over one `TrainConfig`: recipes × learning rates × proxy sizes × seeds.

    Every run starts from ``base`` with the grid point's size, peak LR and seed (and the decay floor that ends
    at ``final_lr``), then its recipe transforms that config.

    Attributes:
        recipes: Built-in recipe names (`list_recipes`), ``module:function`` / ``file.py:function`` strings,
            or functions ``TrainConfig -> TrainConfig``.
        lrs: Peak learning rates (log-spaced: LR sensitivity is a mean over this grid).
        sizes: Proxy sizes (`keel.proxy.list_proxy_sizes`); the scaling view needs at least two.
        seeds: Seeds; each seeds both the model initialisation and the data order.
        base: The training settings every run shares (steps, batch, warm-up, clipping at global norm 1 as in
            the paper, validation batches, ...); its ``size``, ``lr``, ``seed`` and ``min_lr_ratio`` are the
            grid's to set.
        final_lr: The LR the cosine decay ends at, the same for every peak LR (the paper decays to 1e-5),
            rather than a fraction of the peak, which leaves high-LR runs ending at a high LR. On the 300-step
            proxy the two give about the same LR sensitivities (BENCHMARKS.md, keel sweep).

    Example:
        >>> SweepConfig(sizes=["tiny"], base=TrainConfig(steps=50, max_grad_norm=1.0)).base.steps
        50
    """

    recipes: Sequence[str | Recipe] = DEFAULT_RECIPES
    lrs: Sequence[float] = field(default_factory=default_lrs)
    sizes: Sequence[str] = ("tiny", "small", "medium")
    seeds: Sequence[int] = (0,)
    base: TrainConfig = field(default_factory=default_base)
    final_lr: float = 1e-5

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("recipes", "lrs", "sizes", "seeds"):
            if len(getattr(self, name)) == 0:
                raise ValueError(f"SweepConfig.{name}=[]; allowed: at least one value")
        bad_lrs = [lr for lr in self.lrs if not (isinstance(lr, (int, float)) and 0 < lr < math.inf)]
        if bad_lrs:
            raise ValueError(f"SweepConfig.lrs contains {bad_lrs}; allowed: finite numbers > 0")
        out_of_range = [seed for seed in self.seeds if not 0 <= seed <= INT64_MAX]
        if out_of_range:  # the sweep store keeps seeds as SQLite integers: 2**63 failed there, after the grid was built
            raise ValueError(f"SweepConfig.seeds contains {out_of_range}; allowed: ints from 0 to 2**63 - 1")
        for name, key in RUN_ID_KEYS.items():
            twice = repeated(getattr(self, name), key)
            if twice is not None:
                shown = list(getattr(self, name))
                raise ValueError(f"SweepConfig.{name}={shown} names the run {twice} twice; allowed: each value once")
        unknown = [s for s in self.sizes if s not in list_proxy_sizes()]
        if unknown:
            raise ValueError(f"SweepConfig.sizes contains {unknown}; allowed: {', '.join(list_proxy_sizes())}")
        if not isinstance(self.base, TrainConfig):
            raise ValueError(f"SweepConfig.base={self.base!r}; allowed: a keel.proxy.trainer.TrainConfig")
        if not (isinstance(self.final_lr, (int, float)) and 0 <= self.final_lr < math.inf):
            raise ValueError(f"SweepConfig.final_lr={self.final_lr!r}; allowed: a finite number >= 0")

    def base_config(self, *, size: str, lr: float, seed: int) -> TrainConfig:
        """The `TrainConfig` of one grid point before a recipe changes it."""
        floor = min(1.0, self.final_lr / lr)  # a peak LR at or below final_lr stays flat
        return dataclasses.replace(self.base, size=size, lr=lr, seed=seed, min_lr_ratio=floor)

    def describe(self) -> dict[str, object]:
        """A JSON-able description (recipes by name), stored with the sweep."""
        base = {k: v for k, v in self.base.describe().items() if k not in GRID_FIELDS}
        return {
            "recipes": [resolve_recipe(r)[0] if callable(r) else r for r in self.recipes],
            "lrs": list(self.lrs),
            "sizes": list(self.sizes),
            "seeds": list(self.seeds),
            "final_lr": self.final_lr,
            "base": base,
        }


def quick_config() -> SweepConfig:
    """The reduced grid of ``keel sweep --quick``: minutes on a 2-core CPU.

    Baseline against QK-norm + z-loss on the two smallest proxies at four LRs of the paper's grid, with the
    default run settings, so its 16 runs are the same runs as those grid points of the full sweep. Not fewer
    steps: at 150 steps neither recipe had recovered from LR 3e-1 by the end, and QK-norm + z-loss was only
    1.0-1.5x less LR-sensitive than the baseline (its logits stayed bounded all the same).
    """
    return SweepConfig(
        recipes=("baseline", "qk_norm_z_loss"),
        lrs=(1e-3, 1e-2, 1e-1, 3e-1),
        sizes=("tiny", "small"),
    )


@dataclass(kw_only=True)
class RunSpec:
    """One run of the grid.

    Attributes:
        run_id: ``recipe/size/lr=<lr>/seed=<seed>``; the run's key in the sweep store and its directory.
        recipe: Recipe name.
        size: Proxy size.
        lr: Peak learning rate.
        seed: Seed.
        config: The config the recipe returned; ``None`` when the recipe raised.
        error: The recipe's exception when it raised.
    """

    run_id: str
    recipe: str
    size: str
    lr: float
    seed: int
    config: TrainConfig | None
    error: str | None = None


def run_id(recipe: str, size: str, lr: float, seed: int) -> str:
    return f"{recipe}/{size}/lr={lr:g}/seed={seed}"


# How each grid list's values appear in a run id (`run_id`). Two values with the same key name one run twice (the
# same value given twice, or LRs equal in %g's six digits: 1e-3 and 0.0010000001), and the sweep store keeps one row
# per run id: run_sweep failed with sqlite3.IntegrityError.
RUN_ID_KEYS: dict[str, Callable[[Any], str]] = {
    "lrs": lambda lr: f"lr={lr:g}",
    "sizes": str,
    "seeds": lambda seed: f"seed={seed}",
}


def repeated(values: Iterable[Any], key: Callable[[Any], str]) -> str | None:
    """The first ``key(value)`` that two of ``values`` share, or ``None``."""
    seen: set[str] = set()
    for value in values:
        if key(value) in seen:
            return key(value)
        seen.add(key(value))
    return None


def expand_grid(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, sizes outermost then recipes, seeds, LRs (small models finish first).

    A recipe that raises for a grid point gives a spec with ``config=None`` and the error, so the sweep
    records it and goes on; an unknown recipe name raises ``ValueError`` before anything runs.
    """
    recipes = [resolve_recipe(r) for r in config.recipes]
    names = [name for name, _ in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"SweepConfig.recipes names {names}; allowed: each name once")
    specs = []
    for size in config.sizes:
        for name, recipe in recipes:
            for seed in config.seeds:
                for lr in config.lrs:
                    spec = RunSpec(
                        run_id=run_id(name, size, lr, seed),
                        recipe=name,
                        size=size,
                        lr=float(lr),
                        seed=seed,
                        config=None,
                    )
                    try:
                        spec.config = _checked(recipe(config.base_config(size=size, lr=float(lr), seed=seed)))
                    except Exception as exc:  # a user's recipe: record it, never stop the sweep
                        spec.error = f"recipe {name!r} raised {type(exc).__name__}: {exc}"
                    specs.append(spec)
    return specs


def _checked(config: object) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"returned {type(config).__name__}; allowed: a keel.proxy.trainer.TrainConfig")
    return config
