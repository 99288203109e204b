"""Per-source gradient probe: each data source's loss, per-example gradient norm and gradient direction on a batch.

Where the examples of a batch come from several sources (data sets, domains, shards, clients) and the loop can say
which, this probe measures, every ``every`` steps, on the step's own batch (``guard.step(..., batch=batch)``):

| key                    | what, per source ``<s>`` present in the batch                  | cost                      |
|------------------------|----------------------------------------------------------------|---------------------------|
| `source/loss/<s>`      | mean loss of its examples                                      | one forward, no gradients |
| `source/grad_norm/<s>` | mean per-example gradient norm of its examples (`grad_norms`)  | one vmapped backward      |
| `source/grad_cos/<s>`  | cosine of its summed gradient with the rest of the batch's     | one backward per source   |
|                        | (`cosine`; needs a second source in the batch)                 |                           |

All three come from the parameters before the step's update, in eval mode (no dropout draws, batch-norm statistics
untouched), with every RNG stream restored after and ``.grad`` untouched (`keel.signals.attribution`'s
side-effect-free measurements, reused), so ``policy="observe"`` stays bit-identical. Steps between measurements cost
nothing; the source tags are read to the host on measured steps only. Cost of one measured step, in training steps
(forward + backward + SGD step) on a CPU, one thread, batch of 3 sources: on an MLP 16-256-256-4, batch 256, the
loss 0.5×, the cosine 2.8× more, the per-example gradient norms 50× more (vmap materialises every example's
gradient); on a 16-32-32-4 MLP, batch 48, where Python overhead dominates, 0.9×, 6.6× and 6.9× more. Hence the
defaults: loss and cosine on, per-example norms opt-in.

The loss of one measured batch is noisy where a source has a handful of examples in it (on the proxy LM, batch 16
from three sources: σ ≈ 0.12 of its level). A loop that keeps each example's loss hands keel every step's per-source
means instead, at the cost of a few reductions: ``guard.step(losses.mean(), signals=source_losses(losses, tags))``;
the detector pools them over ten steps and then judges the probe's cosine (and norms) only — or, with no probe, the
loss alone.

Source names are ``str(tag)`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_`` (at most 64), so a
key stays one slash path; two tags that sanitise to the same name are refused rather than merged.

The histories and the judgement — which source drifted from the others — are `keel.detect.source_drift`'s: the
long/short histories of per-source gradient statistics are MUD-HoG's (Gupta et al. 2022, federated clients), here
for the sources of one process's batches.

Example:
    >>> import torch.nn.functional as F
    >>> probe = SourceGradientsProbe(SourceGradientsConfig(
    ...     source_fn=lambda batch: batch[2].tolist(),                      # batch = (x, y, source id)
    ...     loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), every=10))
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from, require_ints
from keel.signals.attribution import (
    ExampleLossFn,
    _map,
    _require_one_per_example,
    _side_effect_free,
    batch_size,
    example_grad_norms,
    example_losses,
)
from keel.signals.probe import Measurements, StepContext

SourceFn = Callable[[Any], "Sequence[Hashable] | Tensor"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_NAME = 64


@dataclass(kw_only=True)
class SourceGradientsConfig:
    """Settings of the per-source gradient probe.

    Attributes:
        source_fn: ``source_fn(batch) -> tags``: one source tag per example (a list of str/int, or a 1-d tensor).
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch_size]``, each example's loss (as `keel.Attribution`'s).
        every: Cadence in steps (measured at steps divisible by it).
        grad_norms: Measure the mean per-example gradient norm per source (a vmapped per-example backward: costly,
            see above).
        cosine: Measure each source's gradient cosine with the rest of the batch (a backward per source).
        max_sources: The most distinct sources a batch may hold; more is refused (a ``source_fn`` that returns
            example ids instead of sources would otherwise make thousands of signals).
    """

    source_fn: SourceFn | None = None
    loss_fn: ExampleLossFn | None = None
    every: int = 10
    grad_norms: bool = False
    cosine: bool = True
    max_sources: int = 32

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "every")
        require_ints(self, "max_sources", minimum=2)
        for name in ("source_fn", "loss_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"SourceGradientsConfig.{name}={value!r:.60}; allowed: a callable or None")


def source_names(tags: Sequence[Hashable] | Tensor, size: int, *, max_sources: int = 32) -> list[str]:
    """Each example's sanitised source name.

    Raises:
        ValueError: Not one tag per example; more than ``max_sources`` sources; two tags with one sanitised name.

    Example:
        >>> source_names(["web", "code/py", "web", 3], 4)
        ['web', 'code_py', 'web', '3']
    """
    if isinstance(tags, Tensor):
        tags = tags.detach().cpu().reshape(-1).tolist() if tags.dim() <= 1 else list(tags)
    tags = list(tags)
    if len(tags) != size:
        raise ValueError(f"source_fn returned {len(tags)} tags for a batch of {size}; allowed: one tag per example")
    by_tag: dict[Hashable, str] = {}
    owner: dict[str, Hashable] = {}
    for tag in tags:
        if tag in by_tag:
            continue
        name = _UNSAFE.sub("_", str(tag))[:MAX_NAME] or "_"
        if name in owner:
            raise ValueError(
                f"source tags {owner[name]!r} and {tag!r} both sanitise to {name!r}; allowed: tags that stay "
                "distinct after replacing characters outside [A-Za-z0-9_.-] with '_'"
            )
        by_tag[tag], owner[name] = name, tag
    if len(by_tag) > max_sources:
        raise ValueError(
            f"source_fn returned {len(by_tag)} distinct sources in one batch; allowed: at most "
            f"max_sources={max_sources} (a tag per source, not per example)"
        )
    return [by_tag[t] for t in tags]


def group_mean(values: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The mean of ``values`` over the examples of each source, 0-d tensors by source name (first-seen order).

    Example:
        >>> {k: float(v) for k, v in group_mean(torch.tensor([1.0, 2.0, 4.0]), ["a", "b", "a"]).items()}
        {'a': 2.5, 'b': 2.0}
    """
    out = {}
    for name in dict.fromkeys(names):
        index = torch.tensor([i for i, n in enumerate(names) if n == name], device=values.device)
        out[name] = values.index_select(0, index).mean()
    return out


def source_losses(losses: Tensor, tags: Sequence[Hashable] | Tensor, *, max_sources: int = 32) -> dict[str, Any]:
    """The loop's own per-example losses, as each source's mean and count: ``guard.step(loss, signals=...)``.

    The loss of one measured batch is noisy where a source has a handful of examples in it; the loop computes every
    example's loss on every step anyway, so passing these costs a few small reductions and no forward, and
    `keel.detect.SourceDriftDetector` pools them over ``loss_block`` steps (ten times the examples at ten steps).
    Means stay 0-d tensors on the losses' device (no host sync); counts are host numbers, from the tags (pass the
    loader's tags as a list or a CPU tensor: tags on a GPU are read to the host).

    Raises:
        ValueError: ``losses`` is not one value per tag (a 1-d tensor), or `source_names`'s reasons.

    Example:
        >>> signals = source_losses(torch.tensor([1.0, 3.0, 5.0]), ["web", "code", "web"])
        >>> [(k, float(v)) for k, v in signals.items() if k.endswith("/web")]
        [('source/step_loss/web', 3.0), ('source/step_count/web', 2.0)]
    """
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise ValueError(
            f"source_losses: losses={type(losses).__name__}{tuple(getattr(losses, 'shape', ()))}; allowed: a 1-d "
            "tensor, one loss per example (e.g. F.cross_entropy(..., reduction='none'))"
        )
    names = source_names(tags, losses.shape[0], max_sources=max_sources)
    losses = losses.detach()
    out: dict[str, Any] = {}
    for name, mean in group_mean(losses, names).items():
        out[keys.per_param(keys.SOURCE_STEP_LOSS_PER_SOURCE, name)] = mean
        out[keys.per_param(keys.SOURCE_STEP_COUNT_PER_SOURCE, name)] = float(names.count(name))
    return out


def source_cosines(
    model: torch.nn.Module, loss_fn: ExampleLossFn, batch: Any, names: Sequence[str]
) -> dict[str, Tensor]:
    """Each source's cosine between its summed gradient and the summed gradient of the batch's other examples.

    One forward and backward per source on its examples (the whole batch once, in parts); the model in eval mode,
    ``.grad`` and the RNG streams untouched. A label-flipped or noisy source pulls against the others: its cosine
    falls, towards or below 0. Sources with no other source in the batch get none.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, list[Tensor]] = {}
    with _side_effect_free(model), torch.enable_grad():
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name])
            part = _map(batch, _rows(index))
            losses = _require_one_per_example(loss_fn(model, part), len(index), "loss_fn")
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            sums[name] = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params, strict=True)]
    if len(sums) < 2:
        return {}
    total = [torch.stack(parts).sum(0) for parts in zip(*sums.values(), strict=True)]
    out = {}
    for name, own in sums.items():
        dot = sum(((t - g).double() * g.double()).sum() for t, g in zip(total, own, strict=True))
        own_sq = sum(g.double().pow(2).sum() for g in own)
        rest_sq = sum((t - g).double().pow(2).sum() for t, g in zip(total, own, strict=True))
        out[name] = (dot / (own_sq * rest_sq).sqrt().clamp_min(1e-300)).float()  # type: ignore[union-attr]
    return out


def _rows(index: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda t: t.index_select(0, index.to(t.device))


class SourceGradientsProbe:
    """Measures each source's loss, per-example gradient norm and gradient cosine on the step's batch.

    Not in the probe registry: without a ``source_fn`` and a ``loss_fn`` it has nothing to measure. Pass it to the
    Guard as an object, with the `keel.detect.SourceDriftDetector` that reads it:
    ``Guard(..., probes=[*DEFAULT_PROBES, probe], detectors=[*default_detectors(), SourceDriftDetector()])`` and
    ``guard.step(loss, batch=batch)``.

    Args:
        config: Settings; or pass `SourceGradientsConfig` fields as keywords.
    """

    name = "source_gradients"

    def __init__(self, config: SourceGradientsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, SourceGradientsConfig, config, fields)
        self._warned = False

    def measure(self, ctx: StepContext) -> Measurements:
        c = self.config
        if ctx.step % c.every != 0:
            return {}
        if c.source_fn is None or c.loss_fn is None or ctx.batch is None:
            self._warn_once(ctx.batch is None)
            return {}
        batch = ctx.batch
        names = source_names(c.source_fn(batch), batch_size(batch), max_sources=c.max_sources)
        out: Measurements = {}
        losses = example_losses(ctx.model, c.loss_fn, batch)
        out.update({keys.per_param(keys.SOURCE_LOSS_PER_SOURCE, s): v for s, v in group_mean(losses, names).items()})
        if c.grad_norms:
            norms, _ = example_grad_norms(ctx.model, c.loss_fn, batch)
            family = keys.SOURCE_GRAD_NORM_PER_SOURCE
            out.update({keys.per_param(family, s): v for s, v in group_mean(norms, names).items()})
        if c.cosine:
            cosines = source_cosines(ctx.model, c.loss_fn, batch, names)
            out.update({keys.per_param(keys.SOURCE_GRAD_COS_PER_SOURCE, s): v for s, v in cosines.items()})
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}

    def _warn_once(self, no_batch: bool) -> None:
        if self._warned:
            return
        self._warned = True
        what = (
            "the loop passed no batch (guard.step(loss, batch=batch))"
            if no_batch
            else "no source_fn or loss_fn given (SourceGradientsConfig(source_fn=..., loss_fn=...))"
        )
        warnings.warn(f"source_gradients: nothing measured: {what}", KeelWarning, stacklevel=3)
