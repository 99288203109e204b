"""One sweep run: train a proxy under ``Guard(policy="observe")``, then read its end signals from its store.

`run_one` is the unit of work every backend ships to a worker (a local process, a Ray task). It never
raises: a run that raises is returned with status ``"error"`` and its traceback, one whose loss turns
non-finite is stopped there and returned as ``"diverged"``, so one bad run never stops a sweep.
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keel._core import keys
from keel.guard.console import silenced
from keel.proxy.sweep.grid import RunSpec
from keel.proxy.trainer import TrainConfig, build_model, evaluate, train_proxy
from keel.store import RunReader, store_path

# The proxy's token and position embeddings: left out of the parameter count, as Wortsman et al. count.
EMBEDDINGS = ("tok_emb.", "pos_emb.")
# The run store's signal each end-of-run field of `RunResult` is the median of. A dense model records no router
# signal: its router fields stay NaN.
END_SIGNALS = {
    "max_attn_logit": keys.ATTN_MAX_LOGIT,
    "log_z": keys.LOGITS_LOG_Z,
    "grad_norm": keys.GRAD_NORM,
    "router_z": keys.MOE_ROUTER_Z,
    "load_imbalance": keys.MOE_LOAD_IMBALANCE,
    "dead_experts": keys.MOE_DEAD_EXPERTS,
}
# End signals are the median of the last END_WINDOW recorded steps: one step's gradient norm is noisy.
END_WINDOW = 10


@dataclass(kw_only=True)
class RunResult:
    """What a finished run reports back to the sweep store.

    Attributes:
        run_id: The run's id (`RunSpec.run_id`).
        status: ``"done"``, ``"diverged"`` (a non-finite loss, or a final loss no better than at
            initialisation) or ``"error"`` (the recipe or the training raised).
        init_loss: Validation loss of the freshly initialised model: ℓ₀ of the LR-sensitivity formula.
        final_loss: Mean training loss over the last `END_WINDOW` steps (includes any z-loss term).
        val_loss: Validation loss at the end of training: the loss LR sensitivity is computed from.
        max_attn_logit: Largest pre-softmax attention logit over layers, median of the last steps.
        log_z: Mean output log-partition log Z, median of the last steps.
        grad_norm: Global gradient norm, median of the last steps.
        router_z: The router's z (max over MoE layers of mean logsumexp(router logits)², the unscaled z-loss),
            median of the last steps; NaN for a dense model.
        load_imbalance: Max over MoE layers of max/mean tokens per expert (1 balanced, E/k collapsed), median of
            the last steps; NaN for a dense model.
        dead_experts: Experts (all layers) that received no token, median of the last steps; NaN for a dense model.
        n_params: Non-embedding parameter count of the model (the paper's size axis).
        steps_done: Optimizer steps taken.
        wall_s: Seconds the run took, initial evaluation included.
        error: The exception and traceback of an ``"error"`` run, or why a run counts as diverged.
    """

    run_id: str
    status: str
    init_loss: float = math.nan
    final_loss: float = math.nan
    val_loss: float = math.nan
    max_attn_logit: float = math.nan
    log_z: float = math.nan
    grad_norm: float = math.nan
    router_z: float = math.nan
    load_imbalance: float = math.nan
    dead_experts: float = math.nan
    n_params: int = 0
    steps_done: int = 0
    wall_s: float = 0.0
    error: str | None = None


class _NonFinite(Exception):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss {loss} at step {step}")
        self.step = step


def run_one(spec: RunSpec, run_dir: str | Path, *, threads: int = 1) -> RunResult:
    """Train one grid point under ``Guard(policy="observe")`` into ``run_dir`` and summarise it.

    Args:
        spec: The run.
        run_dir: The run's own directory; cleared first, so a run killed half-way starts afresh.
        threads: ``torch.set_num_threads`` for this run (1 per worker keeps results identical across
            backends and workers from oversubscribing the cores).

    Returns:
        A `RunResult`; never raises for a failing run.
    """
    start = time.perf_counter()
    if spec.config is None:
        return RunResult(run_id=spec.run_id, status="error", error=spec.error)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    config = spec.config
    result = RunResult(run_id=spec.run_id, status="done")
    losses: list[float] = []

    def stop_when_non_finite(step: int, loss: float) -> None:
        losses.append(loss)
        if not math.isfinite(loss):
            raise _NonFinite(step, loss)  # NaN stays NaN: the rest of the run would measure nothing

    try:
        result.init_loss, result.n_params = _init_loss(config)
        with silenced():  # the sweep's own lines and tables summarise its runs; each run's findings are in its store
            run = train_proxy(config, policy="observe", run_dir=str(run_dir), progress=stop_when_non_finite)
        result.val_loss = run.val_loss
    except _NonFinite as exc:
        result.status, result.error = "diverged", f"non-finite training loss at step {exc.step}"
    except Exception as exc:  # the sweep records every failure and goes on
        result.status = "error"
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    finally:
        torch.set_num_threads(threads_before)  # in-process runs leave the caller's setting as it was
    result.steps_done = len(losses)
    if losses:
        result.final_loss = float(np.mean(losses[-END_WINDOW:]))
    if result.status == "done" and not (result.val_loss < result.init_loss):
        result.status = "diverged"
        result.error = f"final validation loss {result.val_loss:.4g} >= loss at initialisation {result.init_loss:.4g}"
    if store_path(run_dir).is_file():
        for name, value in _end_signals(run_dir).items():
            setattr(result, name, value)
    result.wall_s = time.perf_counter() - start
    return result


def _init_loss(config: TrainConfig) -> tuple[float, int]:
    model = build_model(config)  # the model the run starts from
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(EMBEDDINGS))
    return evaluate(model, config), non_embedding


def _end_signals(run_dir: Path) -> dict[str, float]:
    """Each `END_SIGNALS` field of `RunResult`: the median of its signal's last finite values (NaN if none)."""
    with RunReader(run_dir) as reader:
        return {name: _tail_median(reader.signal(key)[1]) for name, key in END_SIGNALS.items()}


def _tail_median(values: np.ndarray) -> float:
    # A run that diverged ends in NaN; its last finite values are the signals worth keeping.
    finite = values[np.isfinite(values)][-END_WINDOW:]
    return float(np.median(finite)) if finite.size else math.nan
