"""Opposing-signals probe: a fixed probe set's per-example losses, and groups of them moving in opposite directions.

| key                   | cadence                                        | cost                                        |
|-----------------------|------------------------------------------------|---------------------------------------------|
| `opposing/rose`       | every `every` steps, from the 2nd measurement  | one forward pass of the probe set, no grads |
| `opposing/opposition` | as above                                       | a sort of the probe set's loss changes      |
| `opposing/antiphase`  | as above, from the 3rd measurement             | `history` × probe-set losses kept on device |

Rosenberg & Risteski (2023) find that loss spikes and oscillation are driven by paired groups of training outliers
with strong opposing signals (the paper's example: sky or background colour): large, consistent features whose
gradients point in opposite directions. Optimization balances the two groups in a narrow valley, sharpening follows,
the two groups' losses oscillate in antiphase (high on one group, then on the other), then the overall loss spikes.
They find the groups through the largest per-example loss changes between iterations. This probe follows that
identification on a small fixed probe set of examples (a few dozen), every ``every`` steps:

1. ℓ_i(t): each probe example's loss, from one forward pass without gradients (`keel.signals.attribution.
   example_losses`: eval mode, keel's hooks quiet, RNG streams restored), and Δ_i = ℓ_i(t) − ℓ_i(t_prev) since the
   previous measurement.
2. ``opposing/rose``: the fraction of probe examples with Δ_i > 0 (those whose loss fell: 1 − rose, less exact ties).
3. The groups: R, the ``top_k`` examples with the largest Δ (the top risers), and F, the ``top_k`` with the most
   negative Δ (the top fallers). ``opposing/opposition`` = min(mean_R Δ, −mean_F Δ), floored at 0: how far both
   groups moved in opposite directions, whichever moved less, in the loss's own units. It is 0 when the whole probe
   set moves one way (a healthy descent, or a spike of every example) and large only when one group's loss rises
   while another's falls — the paper's signature, on one interval.
4. ``opposing/antiphase``: the Pearson correlation, over the last ``history`` measurements, of R's mean loss and F's
   mean loss (the groups as chosen now). Antiphase oscillation gives ≈ −1; groups that descend together give > 0.
   It is 0 when either series is constant. (The groups are selected on the latest interval, which biases a pure-noise
   series towards negative values on short histories: read it beside ``opposition``.)

Steps between measurements emit nothing (no key), as does the first measurement (there is no change yet).

Cost: one no-grad forward pass of the probe set every ``every`` steps — with a probe set of 32 examples and the
default ``every=50`` that is well under 1 % of the forwards of a batch-32 loop — plus a ``history`` × n tensor on the
model's device. The probe set must already be on the model's device. It is opt-in: in no probe set.

The history starts over when the probe is built (a rollback's restored parameters show up as one large change of
every example, which counts as no opposition).

References:
    Rosenberg & Risteski 2023, "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
    Optimization", ICLR 2024, arXiv 2311.04163.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from, require_ints
from keel.signals.attribution import ExampleLossFn, batch_size, example_losses
from keel.signals.probe import Measurements, StepContext
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class OpposingSignalsConfig:
    """Settings of the opposing-signals probe.

    Attributes:
        probe_set: A fixed batch of a few dozen examples, as ``loss_fn`` takes it (a tensor, or a tuple/list/dict of
            tensors whose first dimension is the example), on the model's device. None: the probe measures nothing.
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch_size]``, one loss per example (as `keel.Attribution`).
        every: Cadence in steps.
        top_k: Examples in each of the two groups (the top risers, the top fallers).
        history: Measurements kept for ``opposing/antiphase``.
    """

    probe_set: Any = None
    loss_fn: ExampleLossFn | None = None
    every: int = 50
    top_k: int = 4
    history: int = 8

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "every", "top_k")
        require_ints(self, "history", minimum=3)
        if (self.probe_set is None) != (self.loss_fn is None):
            raise ValueError(
                f"OpposingSignalsConfig.probe_set={type(self.probe_set).__name__}, loss_fn="
                f"{type(self.loss_fn).__name__}; allowed: both given, or neither (the probe then measures nothing)"
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(
                f"OpposingSignalsConfig.loss_fn={self.loss_fn!r:.60}; allowed: a callable (model, batch) -> losses"
            )
        if self.probe_set is not None:
            size = batch_size(self.probe_set)
            if size < 2 * self.top_k:
                raise ValueError(
                    f"OpposingSignalsConfig.probe_set holds {size} examples with top_k={self.top_k}; allowed: at "
                    f"least 2 * top_k = {2 * self.top_k} examples (two disjoint groups)"
                )


def opposing_stats(history: Tensor, top_k: int) -> dict[str, Tensor]:
    """The probe's signals from a ``[measurements, examples]`` history of per-example losses (oldest row first).

    Needs at least two rows; ``opposing/antiphase`` needs three. All values are 0-d float32 tensors on the
    history's device; no host sync.

    Example:
        >>> h = torch.tensor([[1.0, 1.0, 2.0, 2.0], [2.0, 1.5, 1.0, 1.9], [1.0, 1.0, 2.0, 2.0]])
        >>> {k: round(float(v), 3) for k, v in opposing_stats(h, top_k=1).items()}
        {'opposing/rose': 0.5, 'opposing/opposition': 1.0, 'opposing/antiphase': -1.0}
    """
    h = history.float()
    delta = h[-1] - h[-2]
    out = {keys.OPPOSING_ROSE: (delta > 0).float().mean()}
    rising, falling = opposing_groups(h, top_k)
    rise, fall = delta[rising].mean(), -delta[falling].mean()
    out[keys.OPPOSING_OPPOSITION] = torch.minimum(rise, fall).clamp_min(0.0)
    if h.shape[0] >= 3:
        a, b = h[:, rising].mean(1), h[:, falling].mean(1)
        a, b = a - a.mean(), b - b.mean()
        denominator = (a.square().sum() * b.square().sum()).sqrt()
        # a constant series has no correlation: 0, found without a host sync
        out[keys.OPPOSING_ANTIPHASE] = torch.where(
            denominator > 0, (a * b).sum() / denominator.clamp_min(torch.finfo(h.dtype).tiny), 0.0
        )
    return out


def opposing_groups(history: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The indices of the ``top_k`` top risers and the ``top_k`` top fallers over the history's last interval.

    Example:
        >>> [g.tolist() for g in opposing_groups(torch.tensor([[1.0, 1.0, 2.0], [0.5, 1.1, 3.0]]), top_k=1)]
        [[2], [0]]
    """
    delta = history[-1].float() - history[-2].float()
    return torch.topk(delta, top_k, largest=True).indices, torch.topk(delta, top_k, largest=False).indices


@PROBES.register("opposing_signals")
class OpposingSignalsProbe:
    """Measures a fixed probe set's per-example losses every ``every`` steps and how groups of them oppose.

    Args:
        config: Settings; or pass `OpposingSignalsConfig` fields as keywords.
    """

    name = "opposing_signals"

    def __init__(self, config: OpposingSignalsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, OpposingSignalsConfig, config, fields)
        self._history: deque[Tensor] = deque(maxlen=self.config.history)
        self._warned = False

    def measure(self, ctx: StepContext) -> Measurements:
        cfg = self.config
        if ctx.step % cfg.every:
            return {}
        if cfg.probe_set is None or cfg.loss_fn is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "opposing_signals: no probe set given, nothing measured; pass OpposingSignalsProbe("
                    "probe_set=batch, loss_fn=lambda model, batch: per-example losses)",
                    KeelWarning,
                    stacklevel=2,
                )
            return {}
        self._history.append(example_losses(ctx.model, cfg.loss_fn, cfg.probe_set))
        if len(self._history) < 2:
            return {}
        return dict(opposing_stats(torch.stack(list(self._history)), cfg.top_k))

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
