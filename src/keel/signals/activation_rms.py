"""Activation probe: RMS and largest magnitude of each residual block's output.

| key                   | cadence             | cost                                                               |
|-----------------------|---------------------|--------------------------------------------------------------------|
| `act/rms`             | every `every` steps | one square-sum and one abs-max pass per block output, in the hook  |
| `act/rms/<block>`     | as above; stored on `log_every` steps | one float per block                              |
| `act/max_abs`         | as above            | free (same passes)                                                 |
| `act/max_abs/<block>` | as above; stored on `log_every` steps | one float per block                              |
| `act/format_max`      | as above            | free: a Python constant per block output (no device work)          |

Growing activations are the backdrop of output-logit and attention-logit growth, and in fp16 they end in overflow
(largest finite value 65504): `act/max_abs` against `act/format_max` — the largest finite value of the format the
outputs are held in, autocast's for a float32 output under autocast (`keel.signals.numerics.judged_format`) — says
how much headroom is left. A non-finite block output shows as a non-finite value for that block and every block
after it, so the first non-finite block in forward order is where NaN/Inf was born — without the metaseq
``NanDetector``'s re-run (metaseq/nan_detector.py). Blocks are found by `find_blocks` (``blocks``,
``transformer.h``, ``model.layers``, ``layers``) or named with ``modules``.

References:
    Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", arXiv 2205.01068 (final-layer
    activation norms rising before divergence); Micikevicius et al. 2018, "Mixed Precision Training".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from
from keel.signals._hooks import (
    ObserverHook,
    add_count,
    find_blocks,
    looks_like_sequence_model,
    named_modules_by_name,
    observing,
)
from keel.signals.attn_logits import due
from keel.signals.norms import accumulation_dtype
from keel.signals.numerics import judged_format
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(kw_only=True)
class ActivationRmsConfig:
    """Settings of the activation probe.

    Attributes:
        every: Cadence in steps.
        modules: Names of the modules whose outputs are measured, in forward order; ``None``: the blocks.
    """

    every: int = 1
    modules: list[str] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"ActivationRmsConfig.every={self.every!r}; allowed: an int >= 1")


def activation_stats(x: Tensor) -> tuple[Tensor, int, Tensor]:
    """(Σ x², number of elements, max |x|) of one activation, float32, on its device; two fused passes.

    A complex activation counts as its real and imaginary parts. Only floating or complex tensors are measured.

    Example:
        >>> activation_stats(torch.tensor([3.0, -4.0]))
        (tensor(25.), 2, tensor(4.))
    """
    x = x.detach()
    if x.is_complex():  # a spectral layer's output: its real and imaginary parts are the numbers that overflow
        x = torch.view_as_real(x)
    if x.numel() == 0:
        return torch.zeros((), device=x.device), 0, torch.zeros((), device=x.device)
    square = torch.linalg.vector_norm(x, dtype=accumulation_dtype(x.dtype)).square().float()
    lo, hi = torch.aminmax(x)  # one pass; vector_norm(ord=inf) is ten times slower on CPU
    return square, x.numel(), torch.maximum(hi.abs(), lo.abs()).float()


@PROBES.register("activation_rms")
class ActivationRmsProbe:
    """RMS and max |x| of block outputs, reduced inside forward hooks.

    Example:
        >>> from keel.proxy import create_proxy_model
        >>> model = create_proxy_model("tiny")
        >>> probe = ActivationRmsProbe()
        >>> probe.attach(model)
        >>> _ = model(torch.zeros(1, 8, dtype=torch.long))
        >>> probe.read()["act/rms/"].names
        ('blocks.0', 'blocks.1')
        >>> probe.detach()
    """

    name = "activation_rms"

    def __init__(self, config: ActivationRmsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, ActivationRmsConfig, config, fields)
        self.names: tuple[str, ...] = ()
        self._handles: list[Any] = []
        self._armed = False
        self._stats: dict[int, list[Any]] = {}
        self._format_max = math.inf  # the narrowest format this step's block outputs are held in
        self._error: Exception | None = None

    def attach(self, model: nn.Module) -> None:
        found = named_modules_by_name(model, self.config.modules) if self.config.modules else find_blocks(model)
        if not found and looks_like_sequence_model(model):
            warnings.warn(
                f"{self.name}: no blocks found in {type(model).__name__}; pass modules=[...]", KeelWarning, stacklevel=2
            )
        self.names = tuple(name for name, _ in found)
        self._handles = [
            m.register_forward_hook(ObserverHook(lambda mod, a, out, i=i: self._hook(i, mod, out)))
            for i, (_, m) in enumerate(found)
        ]
        self._armed = due(0, self.config.every)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int, module: nn.Module, output: Any) -> None:
        if not (self._armed and observing(module)):
            return
        x = (
            output
            if isinstance(output, Tensor)
            else next((o for o in (output if isinstance(output, tuple | list) else ()) if isinstance(o, Tensor)), None)
        )
        if x is None or not (x.is_floating_point() or x.is_complex()):  # a router's indices, a mask: no activation
            return
        try:  # a hook runs inside the user's forward: never break it; `read` reports the error
            with torch.no_grad():
                sq, n, top = activation_stats(x)
            old = self._stats.get(index)
            count = add_count(None if old is None else old[1], n, sq)  # a tensor under torch.compile
            self._stats[index] = [sq, count, top] if old is None else [old[0] + sq, count, torch.maximum(old[2], top)]
            held = judged_format(x.real if x.is_complex() else x)  # a float32 output under autocast: autocast's
            self._format_max = min(self._format_max, torch.finfo(held).max)
        except Exception as exc:
            self._error = exc

    def read(self) -> Measurements:
        """This step's values (what `measure` returns), then starts a new step."""
        stats, self._stats = self._stats, {}
        format_max, self._format_max = self._format_max, math.inf
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"activation hook failed: {error!r}") from error
        if not stats:
            return {}
        order = sorted(stats)
        names = tuple(self.names[i] for i in order)
        rms = torch.stack([(stats[i][0] / stats[i][1]).sqrt() for i in order])
        top = torch.stack([stats[i][2] for i in order])
        return {
            keys.ACT_RMS: rms.amax(),
            keys.ACT_RMS_PER_BLOCK: PerParam(names, rms),
            keys.ACT_MAX_ABS: top.amax(),
            keys.ACT_MAX_ABS_PER_BLOCK: PerParam(names, top),
            # a 0-d tensor as every measurement; float64's range (beyond float32's) counts as float32's: unbounded
            keys.ACT_FORMAT_MAX: torch.full((), min(format_max, FLOAT32_MAX), device=top.device),
        }

    def measure(self, ctx: StepContext) -> Measurements:
        out = self.read()
        self._armed = due(ctx.step + 1, self.config.every)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
