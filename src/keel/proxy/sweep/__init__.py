"""Measure a recipe's stability: learning-rate-sensitivity sweeps on proxy models, locally or on Ray.

After Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities"
(arXiv 2309.14322): a grid of recipes × LRs × proxy sizes × seeds, each run observed by `Guard`, summarised
by LR sensitivity, best LR, the near-optimal LR range, end-of-run attention logits and log Z, and the
growth of those signals with model size.

    from keel.proxy.sweep import SweepConfig, run_sweep
    result = run_sweep(SweepConfig(recipes=["baseline", "qk_norm"]), "runs/sweep")
"""

from keel.proxy.sweep.backends import Backend, LocalBackend, RayBackend, create_backend
from keel.proxy.sweep.grid import RunSpec, SweepConfig, default_lrs, expand_grid, quick_config
from keel.proxy.sweep.metrics import LRSensitivity, cap_losses, lr_sensitivity
from keel.proxy.sweep.plots import write_plots
from keel.proxy.sweep.recipes import DEFAULT_RECIPES, RECIPES, Recipe, list_recipes, resolve_recipe
from keel.proxy.sweep.runner import RunEvent, SweepResult, load_sweep, run_sweep, store_summary
from keel.proxy.sweep.scaling import PowerLawFit, ScalingView, fit_power_law
from keel.proxy.sweep.store import SweepStore
from keel.proxy.sweep.summary import CurveSummary, format_tables, summarize, to_json
from keel.proxy.sweep.worker import RunResult, run_one

__all__ = [
    "DEFAULT_RECIPES",
    "RECIPES",
    "Backend",
    "CurveSummary",
    "LRSensitivity",
    "LocalBackend",
    "PowerLawFit",
    "RayBackend",
    "Recipe",
    "RunEvent",
    "RunResult",
    "RunSpec",
    "ScalingView",
    "SweepConfig",
    "SweepResult",
    "SweepStore",
    "cap_losses",
    "create_backend",
    "default_lrs",
    "expand_grid",
    "fit_power_law",
    "format_tables",
    "list_recipes",
    "load_sweep",
    "lr_sensitivity",
    "quick_config",
    "resolve_recipe",
    "run_one",
    "run_sweep",
    "store_summary",
    "summarize",
    "to_json",
    "write_plots",
]
