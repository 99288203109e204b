"""Numerics probe: how close activations, gradients and logits sit to their number format's overflow and underflow.

| key                                | cadence             | cost                                           |
|------------------------------------|---------------------|------------------------------------------------|
| `numerics/headroom`                | every `every` steps | per watched tensor: an abs, a max, three counts |
| `numerics/headroom/<kind>/<name>`  | as above; stored on `log_every` steps | one float per watched tensor |
| `numerics/near_max`                | as above            | free (same passes)                             |
| `numerics/near_max/<kind>/<name>`  | as above; stored on `log_every` steps | one float per watched tensor |
| `numerics/underflow`               | as above            | free (same passes)                             |
| `numerics/underflow/<kind>/<name>` | as above; stored on `log_every` steps | one float per watched tensor |

Activations are reduced in forward hooks, gradients after backward (in `measure`).

Per watched tensor, against its format's largest finite value ``max`` and smallest normal ``tiny``
(`numerics_stats`): **headroom** = log2(max / amax), the doublings left before the largest value overflows
(Transformer Engine's ``cur_amax`` turned into a margin; negative: values already beyond the format); **near-max**
= the share of elements with |x| ≥ max / 2, within one doubling of overflow (±Inf counts); **underflow** = the
share of the non-zero elements with |x| < tiny, which the format holds as subnormals or flushes to zero (TE's
``underflows%`` counts fp8 zeros after the cast; this counts before it, so true zeros are not blamed). The
headline keys are the worst tensor: the smallest headroom, the largest near-max and underflow shares.

Watched tensors, by ``<kind>``: ``act`` — residual block outputs (`find_blocks`, as the activation probe);
``logits`` — the output head's output (`find_output_head`, any head: range matters whatever loss follows);
``grad`` — each parameter's gradient after backward (after the GradScaler's unscale); ``fp8_in`` — the input of
each torchao ``Float8Linear`` (float8 training), judged as its cast sees it (below).

Which format a tensor is judged against (``NumericsConfig.format`` overrides all of it):
  * a float16, bfloat16 or float8 tensor: its own dtype;
  * a float32 tensor produced inside an autocast region: the autocast dtype — a block output that type
    promotion kept in float32 is cast to it again by the next matmul, and overflows there;
  * a float32 gradient when this step's forward ran under autocast: the autocast dtype (the backward's matmuls ran
    in it; the master gradient is float32 only after accumulation). Every float32 gradient is judged so, also
    those of layers autocast keeps in float32 (norms, embeddings): for them it is a worst case. With a GradScaler,
    pass it (``NumericsProbe(scaler=scaler)``): the backward held the gradients × its scale, and they are judged
    at that scale (read on the device, no sync); without it, the unscaled gradients are judged, which is what an
    fp16 backward without loss scaling would hold;
  * any other float32/float64 tensor: its own dtype, so an fp32 model reads ~125 doublings of headroom and no
    underflow — nothing to fix — and ``format="float16"`` asks instead how it would fare in fp16;
  * ``fp8_in``: torchao scales each tensor to the float8 format's range before the cast (dynamic tensorwise
    scaling, scale = max8 / amax), so that cast cannot overflow and its risk is underflow: values with
    |x| · scale < tiny8 (`numerics_stats` ``fp8=``). Headroom and near-max are then judged against the dtype
    the input is held in. With rowwise scaling a row's scale is larger, so this overcounts its underflow.
    Float8 gradients (e5m2, cast inside the backward) are not watched: that needs a backward hook per layer.

All values are reduced on the device inside the hooks (or after backward for gradients); nothing is read to the
host. Not in the default set: its cost is measured by ``keel bench detect --probe-costs`` (docs/low_precision.md).

References:
    Micikevicius et al. 2018, "Mixed Precision Training", arXiv 1710.03740 (fp16 range, loss scaling);
    Micikevicius et al. 2022, "FP8 Formats for Deep Learning", arXiv 2209.05433; NVIDIA Transformer Engine
    debug features ``LogTensorStats`` / ``LogFp8TensorStats``; torchao ``float8`` (``amax_to_scale``).
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
from keel.signals._hooks import find_blocks, find_output_head, looks_like_sequence_model, observing
from keel.signals.attn_logits import due
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES

FORMATS: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_LOW = (
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
)


@dataclass(kw_only=True)
class NumericsConfig:
    """Settings of the numerics probe.

    Attributes:
        every: Cadence in steps (ranges drift over hundreds of steps; each measurement reads every watched tensor).
        activations: Watch the residual blocks' outputs.
        logits: Watch the output head's output.
        gradients: Watch the parameters' gradients.
        fp8_inputs: Watch the inputs of torchao ``Float8Linear`` layers (float8 training), against their cast.
        format: Judge every tensor against this format (one of `FORMATS`) instead of its own (see the module
            docstring); e.g. ``"float16"`` on an fp32 model: would it fit.
    """

    every: int = 10
    activations: bool = True
    logits: bool = True
    gradients: bool = True
    fp8_inputs: bool = True
    format: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"NumericsConfig.every={self.every!r}; allowed: an int >= 1")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"NumericsConfig.format={self.format!r}; allowed: None, {', '.join(FORMATS)}")


def numerics_stats(
    x: Tensor, dtype: torch.dtype, *, fp8: torch.dtype | None = None, scale: Tensor | float = 1.0
) -> Tensor:
    """[headroom, near-max share, underflow share] of ``x`` against ``dtype``'s range: a float32 vector on x's device.

    Headroom is log2(max / amax) (amax clamped to the format's smallest subnormal, so an all-zero or empty tensor
    reads the format's whole range); near-max is the share of elements with |x| ≥ max / 2 (±Inf included); underflow
    is the share of non-zero elements with |x| < the smallest normal (NaN is non-zero and never below it). With
    ``fp8`` (a float8 dtype), underflow is judged against that format after dynamic per-tensor scaling to its range
    (|x| · max8 / amax < tiny8), headroom and near-max still against ``dtype``. A complex tensor counts its real and
    imaginary parts. ``scale``: the factor the values were held at (a GradScaler's scale: the backward held the
    gradients × scale), applied to the thresholds rather than to ``x`` (no copy; exact for a power-of-2 scale).

    Example:
        >>> numerics_stats(torch.tensor([16376.0, 40000.0, 1e-6, 0.0]), torch.float16)
        tensor([0.7116, 0.2500, 0.3333])
    """
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    info = torch.finfo(dtype)
    smallest = info.tiny * info.eps  # the smallest subnormal
    work = x.abs() if x.dtype == torch.float64 else x.float().abs()  # float32 holds every format's thresholds exactly
    if work.numel() == 0:
        return torch.tensor([math.log2(info.max / smallest), 0.0, 0.0], device=x.device)
    amax = work.amax()
    headroom = math.log2(info.max) - torch.log2((amax * scale).clamp_min(smallest))
    nonzero = torch.count_nonzero(work)
    near = torch.count_nonzero(work >= (info.max / 2) / scale)
    if fp8 is None:
        tiny: Tensor | float = info.tiny / scale
    else:
        f8 = torch.finfo(fp8)
        tiny = amax * (f8.tiny / f8.max)  # tiny8 / scale, with scale = max8 / amax
    # zeros are below any positive threshold: subtract them (work < tiny counts 0 < |x| < tiny and the zeros); a
    # scaled threshold of 0 or NaN (amax 0 or NaN) counts nothing, hence the clamp
    under = (torch.count_nonzero(work < tiny) - (work.numel() - nonzero)).clamp_min(0)
    return torch.stack([headroom.float(), near.float() / work.numel(), under.float() / nonzero.clamp_min(1).float()])


def judged_format(x: Tensor, override: torch.dtype | None = None) -> torch.dtype:
    """The format a tensor's range is judged against (module docstring): override, low-precision dtype, autocast's."""
    if override is not None:
        return override
    if x.dtype in _LOW:
        return x.dtype
    device = x.device.type
    try:
        autocast = x.dtype == torch.float32 and torch.is_autocast_enabled(device)
    except RuntimeError:  # a device without autocast (meta, some backends): the tensor's own dtype
        return x.dtype
    return torch.get_autocast_dtype(device) if autocast else x.dtype


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list):
        return next((v for v in value if isinstance(v, Tensor)), None)
    return None


def _fp8_input_dtype(module: nn.Module) -> torch.dtype | None:
    """The float8 dtype a torchao ``Float8Linear`` casts its input to (read by attribute: no torchao import)."""
    if type(module).__name__ != "Float8Linear":
        return None
    cast = getattr(getattr(module, "config", None), "cast_config_input", None)
    dtype = getattr(cast, "target_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float8_e4m3fn


@PROBES.register("numerics")
class NumericsProbe:
    """Headroom, near-max and underflow shares of activations, logits, gradients and float8 inputs.

    Example:
        >>> from keel.proxy import create_proxy_model
        >>> model = create_proxy_model("tiny")
        >>> probe = NumericsProbe(format="float16", gradients=False)
        >>> probe.attach(model)
        >>> _ = model(torch.zeros(1, 8, dtype=torch.long))
        >>> probe.read()["numerics/headroom/"].names
        ('act/blocks.0', 'act/blocks.1', 'logits/head')
        >>> probe.detach()
    """

    name = "numerics"

    def __init__(self, config: NumericsConfig | None = None, *, scaler: Any = None, **fields: object) -> None:
        """``scaler``: the loop's ``torch.amp.GradScaler``, whose scale the gradients were held at (see above)."""
        self.config = config_from(self, NumericsConfig, config, fields)
        self.scaler = scaler
        self._override = FORMATS[self.config.format] if self.config.format else None
        self.names: list[str] = []
        self._handles: list[Any] = []
        self._armed = False
        self._stats: dict[int, Tensor] = {}
        self._autocast: torch.dtype | None = None  # the autocast dtype this step's forward ran under
        self._error: Exception | None = None

    def attach(self, model: nn.Module) -> None:
        watched: list[tuple[str, nn.Module, torch.dtype | None]] = []  # (name, module, fp8 dtype of its input)
        if self.config.activations:
            blocks = find_blocks(model)
            if not blocks and looks_like_sequence_model(model):
                warnings.warn(f"{self.name}: no blocks found in {type(model).__name__}", KeelWarning, stacklevel=2)
            watched += [(f"act/{n}", m, None) for n, m in blocks]
        head = find_output_head(model) if self.config.logits else None
        if head is not None:
            watched.append((f"logits/{head[0]}", head[1], None))
        if self.config.fp8_inputs:
            for n, m in model.named_modules():
                fp8 = _fp8_input_dtype(m)
                if fp8 is not None:
                    watched.append((f"fp8_in/{n}", m, fp8))
        self.names = [n for n, _, _ in watched]
        for i, (_, module, fp8) in enumerate(watched):
            if fp8 is not None:
                hook = module.register_forward_pre_hook(lambda mod, args, i=i, f=fp8: self._hook(i, mod, args, f))
            else:
                hook = module.register_forward_hook(lambda mod, args, out, i=i: self._hook(i, mod, out, None))
            self._handles.append(hook)
        self._armed = due(0, self.config.every)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int, module: nn.Module, value: Any, fp8: torch.dtype | None) -> None:
        if not (self._armed and observing(module)):
            return
        x = _first_tensor(value)
        if x is None or not (x.is_floating_point() or x.is_complex()):
            return
        try:  # a hook runs inside the user's forward: never break it; `read` reports the error
            if torch.is_autocast_enabled(x.device.type):
                self._autocast = torch.get_autocast_dtype(x.device.type)
            with torch.no_grad():
                stats = numerics_stats(x, judged_format(x, self._override), fp8=fp8)
            old = self._stats.get(index)  # micro-batches of one step: the worst of each
            self._stats[index] = stats if old is None else _worst(old, stats)
        except Exception as exc:
            self._error = exc

    def read(self, ctx: StepContext | None = None) -> Measurements:
        """This step's values (what `measure` returns; with ``ctx``, the gradients too), then starts a new step."""
        stats, self._stats = self._stats, {}
        autocast, self._autocast = self._autocast, None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"numerics hook failed: {error!r}") from error
        names = [self.names[i] for i in sorted(stats)]
        rows = [stats[i] for i in sorted(stats)]
        if ctx is not None and self.config.gradients:
            scale = self._grad_scale()
            with torch.no_grad():
                for name, g in zip(ctx.names, ctx.grads, strict=True):
                    override = self._override or (autocast if g.dtype == torch.float32 else None)
                    names.append(f"grad/{name}")
                    rows.append(numerics_stats(g, judged_format(g, override), scale=scale))
        if not rows:
            return {}
        table = torch.stack(rows)  # (tensors, 3): headroom, near-max, underflow
        names_t = tuple(names)
        return {
            keys.NUMERICS_HEADROOM: table[:, 0].amin(),
            keys.NUMERICS_HEADROOM_PER_NAME: PerParam(names_t, table[:, 0]),
            keys.NUMERICS_NEAR_MAX: table[:, 1].amax(),
            keys.NUMERICS_NEAR_MAX_PER_NAME: PerParam(names_t, table[:, 1]),
            keys.NUMERICS_UNDERFLOW: table[:, 2].amax(),
            keys.NUMERICS_UNDERFLOW_PER_NAME: PerParam(names_t, table[:, 2]),
        }

    def _grad_scale(self) -> Tensor | float:
        """The GradScaler's scale as a device tensor (``get_scale()`` would read it to the host), else 1."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return 1.0
        return scaler._scale.float()

    def measure(self, ctx: StepContext) -> Measurements:
        out = self.read(ctx) if due(ctx.step, self.config.every) else {}
        self._armed = due(ctx.step + 1, self.config.every)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}


def _worst(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise worst of two [headroom, near-max, underflow] rows: the smaller headroom, the larger shares."""
    return torch.stack([torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1]), torch.maximum(a[2], b[2])])
