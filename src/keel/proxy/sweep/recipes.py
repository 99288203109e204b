"""Recipes: named transforms of a proxy `TrainConfig` (baseline, QK-norm, z-loss, independent weight decay).

A recipe is any function ``recipe(base: TrainConfig) -> TrainConfig``: the sweep hands it the grid point's
base config (size, learning rate, seed, steps already set) and trains the config it returns. The built-in
ones are the arms of Wortsman et al. (2023); a user's own recipe is a function in a module or a ``.py`` file,
named on the command line as ``package.module:function`` or ``path/to/file.py:function``.

The built-ins share one file rather than one file each: each is a three-line config transform, and the
registry name equals the function's name instead of a file stem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from torch import nn

from keel._core.registry import Registry
from keel.losses.router import ROUTER_Z_LOSS_COEFFICIENT
from keel.nn import create_stabilizer, fake_quantize, stabilize
from keel.proxy.moe import MoeConfig
from keel.proxy.trainer import TrainConfig

Recipe = Callable[[TrainConfig], TrainConfig]

RECIPES: Registry[TrainConfig] = Registry("recipe")

# PaLM's and Wortsman et al.'s z-loss coefficient.
Z_LOSS_COEFFICIENT = 1e-4
# Wortsman et al.'s independent decay per step, λ = 1e-4 (from secondary notes, not yet checked against the
# paper): AdamW's common weight_decay 0.1 at LR 1e-3, made independent of the swept LR. It is a rate per step
# (Adam's updates balance it at |θ| ≈ lr/λ), so it is kept as is on short proxy runs, where it decays little.
INDEPENDENT_WEIGHT_DECAY = 1e-4
# The LR-coupled AdamW decay that independent decay replaces: p ← p − lr·0.1·p.
DECOUPLED_WEIGHT_DECAY = 0.1
# EvoMoE's switch to hard top-1 routing, in updates: keel's choice for the proxy's 200-300-step runs (the paper
# keeps the dense phase for a fraction of training; the official default, −1, has none — seed-catalog T10).
EVOMOE_HARD_STEP = 100
# Stable-SPAM's INT4 runs (TianjinYellow/StableSPAM INT4_scripts/350-stablespam-int4.sh): weights in groups of 256
# on 16 asymmetric levels; AdaGN/AdaClip decays γ1 0.7, γ2 0.9, γ3 0.999; momentum reset every 500 of 20,000
# updates, kept as that fraction of the run; β1 and γ1 decayed by a cosine over the whole run (total_T = steps).
INT4_GROUP_SIZE = 256
STABLE_SPAM_INT4 = {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.999}
STABLE_SPAM_RESET_FRACTION = 500 / 20_000


@RECIPES.register("baseline")
def baseline(base: TrainConfig) -> TrainConfig:
    """The grid point as it is: AdamW, no QK-norm, no z-loss, no weight decay."""
    return base


@RECIPES.register("qk_norm")
def qk_norm(base: TrainConfig) -> TrainConfig:
    """LayerNorm on queries and keys (Dehghani et al. 2023), the fix for attention-logit growth."""
    return dataclasses.replace(base, qk_norm=True)


@RECIPES.register("z_loss")
def z_loss(base: TrainConfig) -> TrainConfig:
    """z-loss 1e-4 · log² Z added to the training loss, the fix for output-logit divergence."""
    return dataclasses.replace(base, z_loss=Z_LOSS_COEFFICIENT)


@RECIPES.register("qk_norm_z_loss")
def qk_norm_z_loss(base: TrainConfig) -> TrainConfig:
    """QK-norm and z-loss together, Wortsman et al.'s default recipe without weight decay."""
    return dataclasses.replace(base, qk_norm=True, z_loss=Z_LOSS_COEFFICIENT)


@RECIPES.register("independent_wd")
def independent_wd(base: TrainConfig) -> TrainConfig:
    """`keel.optim.IndependentAdamW` with λ = 1e-4: weight decay that does not scale with the swept LR."""
    return dataclasses.replace(base, optimizer="independent_adamw", weight_decay=INDEPENDENT_WEIGHT_DECAY)


@RECIPES.register("decoupled_wd")
def decoupled_wd(base: TrainConfig) -> TrainConfig:
    """AdamW's usual decoupled decay, 0.1, whose strength lr·0.1 moves with the swept LR (the comparison for
    ``independent_wd``; not in the default grid)."""
    return dataclasses.replace(base, weight_decay=DECOUPLED_WEIGHT_DECAY)


@RECIPES.register("moe_baseline")
def moe_baseline(base: TrainConfig) -> TrainConfig:
    """Mixture-of-experts MLPs (`keel.proxy.MoeConfig`: 4 experts, top-2, dropless, Switch aux loss 1e-2), or the
    base's own MoE settings when it has them."""
    return dataclasses.replace(base, moe=base.moe or MoeConfig())


@RECIPES.register("moe_zloss")
def moe_zloss(base: TrainConfig) -> TrainConfig:
    """``moe_baseline`` with the ST-MoE router z-loss 1e-3 · mean(logsumexp(router logits)²), the fix for router
    logit growth (Zoph et al. 2022)."""
    return dataclasses.replace(
        base, moe=dataclasses.replace(base.moe or MoeConfig(), router_z_loss=ROUTER_Z_LOSS_COEFFICIENT)
    )


@RECIPES.register("moe_momentum")
def moe_momentum(base: TrainConfig) -> TrainConfig:
    """``moe_baseline`` with MomentumSMoE's heavy-ball residual across the MoE layers (μ 0.7, γ 1; Teo & Nguyen
    2024), applied by `keel.stabilize` as on a user's model."""
    config = moe_baseline(base)
    return dataclasses.replace(config, stabilize=(*config.stabilize, "momentum_smoe"))


def evomoe_gate(model: nn.Module) -> nn.Module:
    """The ``model_fn`` of ``moe_evomoe``: EvoMoE's dense-to-sparse gate on every router, hard from update 100."""
    stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=EVOMOE_HARD_STEP)])
    return model


@RECIPES.register("moe_evomoe")
def moe_evomoe(base: TrainConfig) -> TrainConfig:
    """``moe_baseline`` routed through EvoMoE's dense-to-sparse gate (Nie et al. 2021): a Gumbel-softmax over all
    experts, τ 1.0 → 0.5, hard top-1 from update ``EVOMOE_HARD_STEP``. Replaces the base's ``model_fn``."""
    return dataclasses.replace(moe_baseline(base), model_fn=evomoe_gate)


def int4_weights(model: nn.Module) -> nn.Module:
    """The ``model_fn`` of the int4 recipes: every ``nn.Linear`` but the output head fake-quantized by
    `keel.nn.fake_quantize` on Stable-SPAM's min-max int4 grid, groups of ``INT4_GROUP_SIZE``."""
    return fake_quantize(model, "minmax", bits=4, group_size=INT4_GROUP_SIZE)


@RECIPES.register("int4_adamw")
def int4_adamw(base: TrainConfig) -> TrainConfig:
    """AdamW on 4-bit fake-quantized weights (Stable-SPAM's INT4 setup, straight-through gradients). Replaces
    the base's ``model_fn``."""
    return dataclasses.replace(base, model_fn=int4_weights)


@RECIPES.register("int4_stable_spam")
def int4_stable_spam(base: TrainConfig) -> TrainConfig:
    """`keel.optim.StableSPAM` on 4-bit fake-quantized weights with the paper's INT4 settings, its reset gap
    scaled to the run (Huang et al. 2025). Replaces the base's ``model_fn`` and optimizer."""
    options = {
        **STABLE_SPAM_INT4,
        "reset_interval": max(1, round(STABLE_SPAM_RESET_FRACTION * base.steps)),
        "decay_steps": base.steps,
    }
    return dataclasses.replace(base, model_fn=int4_weights, optimizer="stable_spam", optimizer_options=options)


DEFAULT_RECIPES: tuple[str, ...] = ("baseline", "qk_norm", "z_loss", "qk_norm_z_loss", "independent_wd")


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return RECIPES.names()


def resolve_recipe(recipe: str | Recipe) -> tuple[str, Recipe]:
    """The (name, function) of a recipe given by built-in name, ``module:function``, ``file.py:function``
    or as a function.

    Raises:
        ValueError: An unknown name, a module or file that cannot be loaded, or a missing function.

    Example:
        >>> name, fn = resolve_recipe("qk_norm")
        >>> fn(TrainConfig(size="tiny")).qk_norm
        True
    """
    if callable(recipe):
        return getattr(recipe, "__name__", type(recipe).__name__), recipe
    if recipe in RECIPES:
        return recipe, RECIPES.get(recipe)
    if ":" not in recipe:
        raise ValueError(
            f"unknown recipe {recipe!r}; allowed: {', '.join(list_recipes())}, "
            "package.module:function or path/to/file.py:function"
        )
    where, _, attr = recipe.rpartition(":")
    module = _load_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"recipe {recipe!r}: {where} has no function {attr!r}")
    return attr, fn


# The recipe files loaded in this process, by the module name they were loaded under: a local sweep's workers load
# them again under the same names, so that a TrainConfig hook defined in one (lr_factor=...) reaches them by pickle.
RECIPE_FILES: dict[str, tuple[Path, ModuleType]] = {}


def _load_module(where: str) -> object:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"recipe file {where!r} not found")
        # the file's own name and where it is: two hooked.py of two folders are two modules (their functions pickle
        # by module name in a local sweep's workers)
        where_hash = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        module = load_recipe_file(f"keel_recipe_{path.stem}_{where_hash}", path)
        RECIPE_FILES[module.__name__] = (path.resolve(), module)
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        # `python -m keel` puts the working folder on sys.path, the `keel` script does not: look there too,
        # so `keel sweep --recipes mymodule:fn` finds ./mymodule.py either way
        cwd = os.getcwd()
        if exc.name != where.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise ValueError(f"recipe module {where!r} cannot be imported: {exc}") from exc
        sys.path.append(cwd)
        try:
            return importlib.import_module(where)
        except ImportError as retry:
            raise ValueError(f"recipe module {where!r} cannot be imported: {retry}") from retry
    except ImportError as exc:
        raise ValueError(f"recipe module {where!r} cannot be imported: {exc}") from exc


def load_recipe_file(name: str, path: Path) -> ModuleType:
    """Execute the recipe file ``path`` as a module named ``name`` (not put in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"recipe file {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
