"""Per-example attribution of a bad step: which examples of the batch carried the spike.

Measured on demand only — when a step raised a spike, a non-finite value or a critical finding — from the state
before that step's update, so a healthy step costs nothing. Two measurements of the offending batch:

- `example_losses`: one forward pass without gradients, each example's loss (``loss_fn`` returns them, shape
  ``[batch]``); the model runs in eval mode (no dropout draws, batch-norm statistics untouched) and the RNG
  streams are restored after, so ``policy="observe"`` training stays bit-identical.
- `example_grad_norms` (opt-in, ``Attribution(grad_norms=True)``): each example's gradient norm, by
  ``torch.func`` (``vmap`` of ``grad`` over ``functional_call``); where the model or ``loss_fn`` cannot be
  vmapped (in-place ops on inputs, data-dependent control flow), one backward pass per example instead. The
  gradients are returned, never written into ``.grad``.

`rank_offenders` ranks the examples by their excess over the batch median, in units of the batch's robust spread
(1.4826 × MAD), and marks the outliers (a non-finite value is always one). A batch of squared errors has a heavy
right tail, so a healthy batch nearly always holds an example above the z threshold: on a step whose loss spiked,
an outlier must also carry a share of the spike (`spike_floor`) — under torch.distributed a healthy rank's most
extreme example, six orders of magnitude below another rank's corrupt one, was skip-listed with it.

The idea of attributing a spike to its examples is PaLM's observation (Chowdhery et al. 2022, §5.1) that spikes
come from particular batches in a particular state; the ranking is keel's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints, require_positive
from keel.signals._hooks import quiet

ExampleLossFn = Callable[[nn.Module, Any], Tensor]
MAD_TO_SIGMA = 1.4826  # the MAD of a normal sample times this is its standard deviation
CARRIED_SHARE = 0.01  # on a loss spike, an outlier example carries at least this share of the step's excess


@dataclass(kw_only=True)
class Attribution:
    """How `keel.Guard` attributes a bad step to the examples of its batch.

    Attributes:
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch_size]``: each example's loss, computed as the loop
            computes its loss (the loop's loss is their mean). ``batch`` is what the loop passes as
            ``guard.step(..., batch=...)``: a tensor, or a tuple/list/dict of tensors whose first dimension is the
            example.
        top_k: Examples recorded with the finding, highest excess first.
        z: Robust z-score (excess over the median in units of 1.4826 × MAD) above which an example is an offender;
            offenders go to the skip list.
        grad_norms: Also measure each example's gradient norm (a backward pass per example, vmapped).
    """

    loss_fn: ExampleLossFn
    top_k: int = 8
    z: float = 6.0
    grad_norms: bool = False

    def __post_init__(self) -> None:
        if not callable(self.loss_fn):
            raise ValueError(f"Attribution.loss_fn={self.loss_fn!r:.60}; allowed: a callable (model, batch) -> losses")
        require_ints(self, "top_k")
        require_positive(self, "z")
        check_types(self)


@dataclass(frozen=True, kw_only=True)
class Offender:
    """One example of a bad step's batch, ranked.

    Attributes:
        id: The example id (the loop's ``batch_ids``; the position in the batch when it gave none).
        value: Its loss (or gradient norm).
        z: Its excess over the batch median in robust standard deviations (inf for a non-finite value).
        outlier: ``z`` is above the threshold, or the value is not finite.
    """

    id: int
    value: float
    z: float
    outlier: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "value": self.value, "z": self.z, "outlier": self.outlier}


def rank_offenders(
    values: Sequence[float], ids: Sequence[int], *, top_k: int, z: float, floor: float | None = None
) -> list[Offender]:
    """The ``top_k`` examples with the highest excess over the median, non-finite ones first.

    The spread is 1.4826 × MAD; when more than half the batch has the same value the MAD is 0, and the mean
    absolute deviation stands in (a batch where every example agrees has no outlier: z 0). With a ``floor``
    (`spike_floor`), an example below it is no outlier, whatever its z.

    Example:
        >>> [o.id for o in rank_offenders([1.0, 1.1, 0.9, 9.0, 1.0], [10, 11, 12, 13, 14], top_k=2, z=6)]
        [13, 11]
        >>> rank_offenders([1.0, 1.1, 0.9, 9.0, 1.0], [10, 11, 12, 13, 14], top_k=1, z=6)[0].outlier
        True
        >>> rank_offenders([1.0, 1.1, 0.9, 9.0, 1.0], [10, 11, 12, 13, 14], top_k=1, z=6, floor=50.0)[0].outlier
        False
    """
    if len(values) != len(ids):
        raise ValueError(f"{len(values)} values for {len(ids)} example ids; allowed: one value per example")
    finite = [v for v in values if math.isfinite(v)]
    median = _median(finite) if finite else math.nan
    spread = MAD_TO_SIGMA * _median([abs(v - median) for v in finite]) if finite else math.nan
    if not spread > 0 and finite:
        spread = sum(abs(v - median) for v in finite) / len(finite)

    def score(value: float) -> float:
        if not math.isfinite(value):
            return math.inf
        return 0.0 if not spread > 0 else (value - median) / spread

    def outlier(value: float) -> bool:
        return score(value) > z and (floor is None or not value < floor)  # NaN: always one

    ranked = sorted(zip(ids, values, strict=True), key=lambda pair: -score(pair[1]))[:top_k]
    return [Offender(id=i, value=v, z=score(v), outlier=outlier(v)) for i, v in ranked]


def spike_floor(findings: Iterable[Finding], *, examples: int, share: float = CARRIED_SHARE) -> float | None:
    """The loss an example must reach to carry ``share`` of the step's loss spike; None when no finding is about a
    loss above its baseline (no floor: a gradient-norm spike is not in the losses' units).

    The step's loss is the mean over ``examples`` examples (the batch, times the ranks under torch.distributed,
    whose losses are averaged), so an example of loss ``l`` lifts it by about ``(l - baseline) / examples``; it
    carries ``share`` of the spike's excess when ``l >= baseline + share * examples * (value - baseline)``.

    Example:
        >>> spike = Finding(step=30, kind="loss_spike", severity="critical", signal="loss", value=3.1e4, baseline=0.03)
        >>> round(spike_floor([spike], examples=32))  # a corrupt example (loss 1e6) is above; a healthy 0.05 is not
        9920
    """
    spikes = [
        f
        for f in findings
        if f.signal == keys.LOSS and math.isfinite(f.value) and math.isfinite(f.baseline) and f.value > f.baseline
    ]
    if not spikes:
        return None
    largest = max(spikes, key=lambda f: f.value - f.baseline)
    return largest.baseline + share * examples * (largest.value - largest.baseline)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def example_losses(model: nn.Module, loss_fn: ExampleLossFn, batch: Any) -> Tensor:
    """Each example's loss on ``batch`` with the model as it is, in eval mode, without gradients; the model's
    train/eval flags and every RNG stream are as before on return.

    Raises:
        ValueError: ``loss_fn`` did not return one value per example (a 1-d tensor of the batch's length).
    """
    with _side_effect_free(model), torch.no_grad():
        losses = loss_fn(model, batch)
    return _checked(losses, batch_size(batch), "loss_fn")


def example_grad_norms(model: nn.Module, loss_fn: ExampleLossFn, batch: Any) -> tuple[Tensor, str]:
    """Each example's gradient norm (over the trainable parameters) on ``batch``, and how it was computed:
    ``"vmap"`` (torch.func) or ``"loop"`` (a backward pass per example, when vmap cannot run the model).

    The model runs in eval mode; ``.grad`` and the RNG streams are untouched.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    size = batch_size(batch)
    with _side_effect_free(model):
        try:
            norms = _vmapped_grad_norms(model, loss_fn, batch, params)
            how = "vmap"
        except Exception:  # vmap refuses some models and losses; one backward pass per example always works
            norms = _looped_grad_norms(model, loss_fn, batch, names)
            how = "loop"
    return _checked(norms, size, "per-example gradient norms"), how


def _vmapped_grad_norms(model: nn.Module, loss_fn: ExampleLossFn, batch: Any, params: dict[str, Tensor]) -> Tensor:
    from torch.func import functional_call, grad, vmap

    class _Bound(nn.Module):  # the model, called with the parameters vmap hands in
        def __init__(self, values: dict[str, Tensor]) -> None:
            super().__init__()
            self.values = values

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return functional_call(model, self.values, args, kwargs)

    def one(values: dict[str, Tensor], example: Any) -> Tensor:
        # inside vmap every tensor of the batch has lost its example dimension (a label is 0-d now)
        losses = loss_fn(_Bound(values), _map(example, lambda t: t.unsqueeze(0), scalars=True))
        return _require_one_per_example(losses, 1, "loss_fn (on one example)").sum()

    grads = vmap(grad(one), in_dims=(None, 0), randomness="different")(params, batch)
    squares = torch.stack([g.detach().float().pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0)
    return squares.sqrt()


def _looped_grad_norms(model: nn.Module, loss_fn: ExampleLossFn, batch: Any, names: list[str]) -> Tensor:
    wanted = dict(model.named_parameters())
    params = [wanted[n] for n in names]
    norms = []
    for i in range(batch_size(batch)):
        loss = _require_one_per_example(loss_fn(model, _map(batch, _row(i))), 1, "loss_fn (on one example)").sum()
        grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
        norms.append(torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().sqrt())
    return torch.stack(norms)


def _row(i: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t[i : i + 1]


def batch_size(batch: Any) -> int:
    """The first dimension shared by the batch's tensors.

    Raises:
        ValueError: The batch holds no tensor, or tensors of different first dimensions.
    """
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"batch holds tensors with first dimensions {sorted(sizes)}; allowed: a tensor, or a tuple/list/dict "
            "of tensors that all have the examples along their first dimension"
        )
    return sizes.pop()


def _tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _map(batch: Any, fn: Callable[[Tensor], Tensor], *, scalars: bool = False) -> Any:
    """``batch`` with ``fn`` applied to each tensor with a batch dimension (0-d ones too when ``scalars``; other
    values as they are)."""
    if isinstance(batch, Tensor):
        return fn(batch) if scalars or batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _map(v, fn, scalars=scalars) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        mapped = [_map(v, fn, scalars=scalars) for v in batch]
        return type(batch)(*mapped) if hasattr(batch, "_fields") else type(batch)(mapped)  # a namedtuple: by field
    return batch


def _checked(values: Any, size: int, what: str) -> Tensor:
    return _require_one_per_example(values, size, what).detach().float()


def _require_one_per_example(values: Any, size: int, what: str) -> Tensor:
    """``values`` when it is a 1-d tensor of ``size`` values; the loss of a one-example batch is checked too (the
    batch mean of one example is its loss, so a loss_fn that averages would otherwise pass the gradient path)."""
    if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != size:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{what} returned {shape}; allowed: a 1-d tensor of {size} values, one per example")
    return values


@contextlib.contextmanager
def _side_effect_free(model: nn.Module) -> Iterator[None]:
    """Eval mode and forked RNG streams for the duration; every module's train flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with quiet(), torch.random.fork_rng(devices=devices):  # keel's own hooks: not a training step
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
