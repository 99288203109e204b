"""The weights checked finite right after each applied update, under ``policy="recover"``.

keel finds non-finite parameters at its *next* step, from that step's non-finite loss or gradient norm, and rolls
back then. Between the two, the loop runs on the broken weights, and some loops raise there before keel's next step:
a REINFORCE rollout's ``Categorical(probs)`` refuses NaN probabilities (pytorch/examples' reinforce.py, an update that
leaves an Inf weight: "Expected parameter probs … found invalid values"), TRL's generation its ``multinomial``, a VAE's
BCE its NaN input. So after an applied update the trainable parameters are read once into one value that is not
finite when any of them holds NaN/Inf (`keel.signals.norms.finiteness_witness`), brought to the host once; when it is
not finite, the parameters holding NaN/Inf are named (``torch.isfinite`` on each, on that rare step only: finite
parameters whose float32 sum overflowed are not among them) and `Guard.step` rolls back inside the same call, so the
loop's next forward sees the restored weights.

Cost: one read of the parameters per update (a fraction of what the optimizer's own step reads and writes) and one
device→host copy; under ``torch.distributed`` one all-reduce of a flag, so every rank rolls back together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from keel._core import keys
from keel._core.finding import Finding
from keel.guard.distributed import RankSync
from keel.signals.norms import finiteness_witness

MAX_NAMED = 20  # parameters named in the finding; ``count`` covers the rest (the non-finite detector's limit)


def non_finite_parameters(names: Sequence[str], params: Sequence[Tensor], ranks: RankSync | None) -> list[str]:
    """The names of the parameters holding NaN or ±Inf ([] when every one is finite, on every rank).

    One fused norm read and one host copy when all are finite; on ranks (``ranks``), a flag all-reduced, so that every
    rank answers alike (another rank's broken shard gives this rank ``["another rank's parameters"]``).
    """
    if not params:
        return []
    with torch.no_grad():  # a finite total: every element is; a non-finite one is checked parameter by parameter
        all_finite = math.isfinite(finiteness_witness(params).item())
        broken = [] if all_finite else [n for n, p in zip(names, params, strict=True) if not _finite(p)]
    if ranks is not None and ranks.all_max([float(bool(broken))])[0] > 0 and not broken:
        return ["another rank's parameters"]
    return broken


def broken_update_finding(step: int, broken: list[str]) -> Finding:
    """The critical finding for an update of ``step`` that left the parameters ``broken`` non-finite: the kind and
    signal of the non-finite detector's finding on parameters (the escalation ladder rolls back on it), found one step
    sooner; its onset is the state step ``step + 1`` would have started from."""
    where = ", ".join(broken[:5]) + (" …" if len(broken) > 5 else "")
    return Finding(
        step=step,
        kind="non_finite",
        severity="critical",
        signal=keys.PARAM_NORM,
        value=float("nan"),
        evidence={
            "non_finite": [keys.PARAM_NORM],
            "parameters": broken[:MAX_NAMED],
            "count": len(broken),
            "after_update": True,
            "onset_step": step + 1,
        },
        cause=(
            f"NaN/Inf in parameters ({where}) right after the update of step {step}, whose loss and gradients were "
            "finite: the update overflowed (an LR far too high for this step, an optimizer state that blew up), or the "
            "loop wrote them since the last check (an in-place weight write such as a renorm of a zero row, an adapter "
            "merge, a checkpoint or callback that loaded bad values)."
        ),
        advice=(
            "keel rolled back before the loop's next forward (a rollout or generation from these weights would raise "
            "or sample garbage). If the loop writes into these parameters between steps, check that write; else lower "
            "the learning rate and look at the optimizer's state for the named parameters."
        ),
    )


def _finite(param: Tensor) -> bool:
    return bool(torch.isfinite(param).all())
