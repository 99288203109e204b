"""Weight-oscillation probe: how many fake-quantized weights keep flipping back and forth between two integer codes.

| key                           | cadence     | cost (all quantized layers together)                              |
|-------------------------------|-------------|-------------------------------------------------------------------|
| `qat/oscillation`             | every step  | one pass over the weights: codes, a compare, an EMA update        |
| `qat/oscillation/<layer>`     | `log_every` | one float per layer (reduced every step anyway for the max)       |

In quantization-aware training the straight-through estimator lets a latent weight sit next to a rounding boundary
and cross it at every step, back and forth: its integer code oscillates (1, 2, 1, 2, …) and the quantized network
the forward sees keeps changing while the latent weights barely move (Nagel et al. 2022; OFQ, Liu et al. 2023). Per
weight, as OFQ's ``TrackOscillation``: a *switch* is a change of integer code; an *oscillation* is a switch whose
direction reverses the previous switch's; ``ema ← (1 − m)·ema + m·oscillated`` with momentum m = 0.01. The EMA
estimates the weight's oscillations per step (a weight reversing every k steps settles at an EMA averaging 1/k).

``qat/oscillation/<layer>`` is the share of the layer's weights whose EMA exceeds ``threshold`` (default 0.02:
more than one reversal per 50 steps; OFQ's code asks a freezing threshold of at least 2–3× the momentum, so that a
single reversal, which lifts the EMA by m, never counts), and ``qat/oscillation`` is the largest share over the
layers. The EMA starts at 0, so the share is 0 for the first steps and needs tens of steps of reversals to rise.

Layers found (by layout, not class):

- keel's fake-quantized modules: anything with a ``quantized_codes()`` method (the contract of `keel.nn.statsq`
  and `keel.nn.fake_quant`: the integer code of each weight under the current scale, the weight's shape);
- torchao QAT modules (``FakeQuantizedLinear`` after ``quantize_(model, QATConfig(..., step="prepare"))``): a
  ``weight_fake_quantizer`` with ``scale`` and ``zero_point``; the code is torchao's own
  ``clamp(round(W·(1/scale)) + zero_point, quant_min, quant_max)`` per group (integer zero-point domain), from the
  scale its last forward computed. A disabled quantizer or one that has not run a forward yet is skipped that step;
- torchao's ``Int4WeightFakeQuantizer`` (``QATConfig(Int4WeightOnlyConfig(group_size=g), step="prepare")``), which
  stores no scale: its asymmetric min-max codes 0..15 per group are recomputed from the weight
  (`torchao_int4_codes`). Its float8-activation variant and torchao's ``Float8FakeQuantizer`` have no integer
  codes here and are not tracked.

The codes are read in `measure`, before the optimizer step: they are the codes the step's forward used (torchao's
dynamic scale is the one that forward computed). Every step, because an oscillation with period 2 is invisible to a
probe that looks every other step.

Memory: per quantized weight the previous code (int8 for StatsQ and torchao's signed grids; int16 for other keel
grids and torchao's uint8), the previous switch direction (int8) and the EMA (float32): 6–7 bytes, about 1.5× an
fp32 weight (`WeightOscillationProbe.state_bytes`). A rollback moves the codes back: the tracker sees that
as one switch per weight that changed, which adds at most m to an EMA.

References:
    Liu et al. 2023, Oscillation-free Quantization for Low-bit Vision Transformers (OFQ), ICML, arXiv 2302.02210,
    code ``nbasyl/OFQ`` (``TrackOscillation``); Nagel et al. 2022, Overcoming Oscillations in Quantization-Aware
    Training, ICML, arXiv 2203.11086.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES

MOMENTUM = 0.01  # OFQ's TrackOscillation default


@dataclass
class OscillationState:
    """One layer's tracker state: previous codes, previous switch direction (−1, 0, +1) and the oscillation EMA."""

    codes: Tensor
    direction: Tensor
    ema: Tensor


def new_state(codes: Tensor) -> OscillationState:
    """The state after a first look at ``codes``: no switch seen, EMA 0. Codes are kept as int8 when they come as
    int8 (StatsQ, torchao's signed grids up to 8 bits), else as int16."""
    return OscillationState(
        codes=codes if codes.dtype == torch.int8 else codes.to(torch.int16),
        direction=torch.zeros(codes.shape, dtype=torch.int8, device=codes.device),
        ema=torch.zeros(codes.shape, dtype=torch.float32, device=codes.device),
    )


def track_oscillation_(state: OscillationState, codes: Tensor, momentum: float = MOMENTUM) -> Tensor:
    """Advance ``state`` by one step of ``codes`` (in place) and return this step's oscillation mask.

    A switch is ``codes != state.codes``; an oscillation is a switch whose sign is opposite to the previous
    switch's (`state.direction`); the EMA moves by ``momentum`` toward the mask; the direction keeps its value where
    no switch happened.

    Example:
        >>> state = new_state(torch.tensor([1]))
        >>> [bool(track_oscillation_(state, torch.tensor([c]))) for c in (2, 1, 2, 3)]
        [False, True, True, False]
    """
    delta = codes.to(torch.int16) - state.codes.to(torch.int16)  # int16: int8 codes' difference can overflow int8
    direction = delta.sign().to(torch.int8)
    oscillated = (direction * state.direction) == -1
    state.ema.mul_(1.0 - momentum).add_(oscillated.to(state.ema.dtype), alpha=momentum)
    state.direction = torch.where(delta != 0, direction, state.direction)
    state.codes = codes.to(state.codes.dtype)
    return oscillated


def torchao_codes(weight: Tensor, quantizer: nn.Module) -> Tensor | None:
    """The integer codes torchao's ``IntxFakeQuantizer`` gave ``weight`` in its last forward, or None.

    None when the quantizer is disabled, has not computed a scale yet, is not per-channel/per-group, or uses a
    floating-point zero-point domain (tinygemm's), whose codes are not ``round(W/scale) + zero_point``.
    """
    scale, zero_point, config = (getattr(quantizer, a, None) for a in ("scale", "zero_point", "config"))
    if not getattr(quantizer, "enabled", True) or not isinstance(scale, Tensor) or weight.dim() != 2:
        return None
    bounds = _qvalue_bounds(getattr(config, "dtype", None))
    domain = getattr(getattr(config, "zero_point_domain", None), "name", "INT")
    if bounds is None or domain not in ("INT", "NONE"):
        return None
    group = getattr(getattr(config, "granularity", None), "group_size", None) or weight.shape[-1]  # PerAxis: a row
    if weight.shape[-1] % group:
        return None
    w = weight.detach().reshape(-1, group)  # (rows·groups, group): one scale per group
    s = scale.detach().reshape(-1, 1)
    zp = zero_point.detach().reshape(-1, 1) if isinstance(zero_point, Tensor) and domain == "INT" else 0
    if s.shape[0] != w.shape[0]:
        return None
    # torchao's _quantize_affine_no_dtype_cast: multiply by the reciprocal (not divide), round half to even, clamp
    codes = torch.clamp(torch.round(w * (1.0 / s)) + zp, bounds[0], bounds[1])
    fits_int8 = -128 <= bounds[0] and bounds[1] <= 127  # torch.uint8's 0..255 does not
    return codes.reshape(weight.shape).to(torch.int8 if fits_int8 else torch.int16)


INT4_LEVELS = 15  # torchao's Int4WeightFakeQuantizer (bf16 activations): codes 0..15, asymmetric min-max


def torchao_int4_codes(weight: Tensor, quantizer: nn.Module) -> Tensor | None:
    """The codes torchao's ``Int4WeightFakeQuantizer`` (``QATConfig(Int4WeightOnlyConfig(group_size=g))``) gives
    ``weight``, or None.

    That quantizer stores no scale: per group of g weights it takes scale = max(max − min, 1e-6)/15 and code =
    clamp(round((W − min)/scale), 0, 15) from the weight itself (its ``_bf16_activations_forward``), so the codes
    are recomputed here the same way. None when it is disabled, the weight is not 2-D with rows a multiple of g
    wide, or it quantizes for float8 activations (the weight goes through a per-row float8 cast first).

    Example:
        >>> q = nn.Module()
        >>> q.config = type("Int4WeightFakeQuantizeConfig", (), {"group_size": 2, "activation_dtype": torch.bfloat16})
        >>> torchao_int4_codes(torch.tensor([[0.0, 1.0, -3.0, 0.0]]), q).tolist()
        [[0, 15, 0, 15]]
    """
    config = getattr(quantizer, "config", None)
    group = getattr(config, "group_size", None)
    if not getattr(quantizer, "enabled", True) or getattr(config, "activation_dtype", None) != torch.bfloat16:
        return None
    if weight.dim() != 2 or not isinstance(group, int) or group < 1 or weight.shape[-1] % group:
        return None
    w = weight.detach().float().reshape(weight.shape[0], -1, group)
    low = w.amin(-1, keepdim=True)
    scale = (w.amax(-1, keepdim=True) - low).clamp_min(1e-6) / INT4_LEVELS
    codes = torch.round((w - low) / scale).clamp(0, INT4_LEVELS)  # torchao's _Round is torch.round
    return codes.reshape(weight.shape).to(torch.int8)


def _qvalue_bounds(dtype: object) -> tuple[int, int] | None:
    """(quant_min, quant_max) of a torchao QAT dtype (``torch.int4``, ``torch.uint4``, torchao's ``INT4``, ...): b
    signed bits give [−2^(b−1), 2^(b−1) − 1], unsigned ones [0, 2^b − 1], as torchao's ``_DTYPE_TO_QVALUE_BOUNDS``
    (checked against it in the tests; torchao itself is not imported here).

    Example:
        >>> _qvalue_bounds(torch.int4), _qvalue_bounds(torch.uint8), _qvalue_bounds(torch.float32)
        ((-8, 7), (0, 255), None)
    """
    match = re.fullmatch(r"(u?)int(\d+)", str(dtype).rpartition(".")[2].lower())
    if match is None or not 1 <= int(match[2]) <= 32:
        return None
    bits = int(match[2])
    return (0, 2**bits - 1) if match[1] else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@dataclass(frozen=True)
class QuantizedLayer:
    """A fake-quantized layer the probe tracks: its name and how to read its integer codes."""

    name: str
    codes: Callable[[], Tensor | None]


def find_quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    """keel's fake-quantized modules (a ``quantized_codes()`` method) and torchao's QAT modules
    (``weight_fake_quantizer`` with ``scale``/``zero_point``), in module order.

    Example:
        >>> from keel.nn import fake_quantize
        >>> model = fake_quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "statsq", bits=2, exclude=("1",))
        >>> [layer.name for layer in find_quantized_layers(model)]
        ['0']
    """
    found = []
    for name, module in model.named_modules():
        method = getattr(module, "quantized_codes", None)
        quantizer = getattr(module, "weight_fake_quantizer", None)
        weight = getattr(module, "weight", None)
        if callable(method):
            found.append(QuantizedLayer(name, method))
        elif isinstance(quantizer, nn.Module) and isinstance(weight, Tensor):
            if hasattr(quantizer, "scale"):  # IntxFakeQuantizer: the scale of its last forward
                found.append(QuantizedLayer(name, _torchao_reader(module, quantizer, torchao_codes)))
            elif hasattr(getattr(quantizer, "config", None), "activation_dtype"):  # Int4WeightFakeQuantizer
                found.append(QuantizedLayer(name, _torchao_reader(module, quantizer, torchao_int4_codes)))
    return found


def _torchao_reader(
    module: nn.Module, quantizer: nn.Module, codes: Callable[[Tensor, nn.Module], Tensor | None]
) -> Callable[[], Tensor | None]:
    return lambda: codes(module.weight, quantizer)  # type: ignore[arg-type]  # the weight read each step


@dataclass(kw_only=True)
class WeightOscillationConfig:
    """Settings of the weight-oscillation probe.

    Attributes:
        momentum: EMA momentum of the per-weight oscillation indicator (OFQ: 0.01).
        threshold: A weight counts as oscillating while its EMA exceeds this (0.02: more than one reversal per 50
            steps, 2× the momentum).
        per_layer: Also emit ``qat/oscillation/<layer>`` on ``log_every`` steps.
    """

    momentum: float = MOMENTUM
    threshold: float = 0.02
    per_layer: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if not (isinstance(self.momentum, int | float) and 0 < self.momentum < 1):
            raise ValueError(f"WeightOscillationConfig.momentum={self.momentum!r}; allowed: a number in (0, 1)")
        if not (isinstance(self.threshold, int | float) and 0 <= self.threshold < 1 and math.isfinite(self.threshold)):
            raise ValueError(f"WeightOscillationConfig.threshold={self.threshold!r}; allowed: a number in [0, 1)")


@PROBES.register("weight_oscillation")
class WeightOscillationProbe:
    """Emits the share of each fake-quantized layer's weights that oscillate, and the largest share; nothing (and
    costs nothing) on a model without fake-quantized layers.

    Example:
        >>> probe = WeightOscillationProbe()
        >>> probe.attach(nn.Linear(2, 2))
        >>> probe.layers
        []
    """

    name = "weight_oscillation"

    def __init__(self, config: WeightOscillationConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, WeightOscillationConfig, config, fields)
        self.layers: list[QuantizedLayer] | None = None
        self._states: dict[str, OscillationState] = {}

    def attach(self, model: nn.Module) -> None:
        self.layers = find_quantized_layers(model)
        self._states = {}

    def detach(self) -> None:
        self.layers, self._states = None, {}

    def state_bytes(self) -> int:
        """Bytes the tracker holds (codes, directions, EMAs of every tracked weight)."""
        return sum(t.numel() * t.element_size() for s in self._states.values() for t in (s.codes, s.direction, s.ema))

    def measure(self, ctx: StepContext) -> Measurements:
        if self.layers is None:  # used without Guard.attach (a bare probe): find them now
            self.attach(ctx.model)
        if not self.layers:
            return {}
        names, shares = [], []
        with torch.no_grad():
            for layer in self.layers:
                codes = layer.codes()
                if codes is None:
                    continue
                state = self._states.get(layer.name)
                if state is None or state.codes.shape != codes.shape:
                    self._states[layer.name] = state = new_state(codes)
                else:
                    track_oscillation_(state, codes, self.config.momentum)
                names.append(layer.name)
                shares.append((state.ema > self.config.threshold).float().mean())
        if not shares:
            return {}
        values = torch.stack(shares)
        out: Measurements = {keys.QAT_OSCILLATION: values.max()}
        if self.config.per_layer and ctx.log_step:
            out[keys.QAT_OSCILLATION_PER_LAYER] = PerParam(tuple(names), values)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
