"""Fake quantization: the weights (and optionally the inputs) of ``nn.Linear`` layers rounded to a low-bit grid in
the forward pass, the gradient passed straight through (STE) to the full-precision weights.

This is quantization-aware training as the 4-bit papers simulate it (Stable-SPAM's INT4 runs, OFQ): the model
keeps float weights, the optimizer updates them, and every forward sees their quantized values. It runs on any
device, in any float dtype. `fake_quantize` does the surgery; the quantizers live in a registry
(`QUANTIZERS`, `list_quantizers`), so a new grid is one registered `FakeQuantizer` subclass.

The contract other parts of keel read (the QAT weight-oscillation probe): a fake-quantized module exposes
``quantized_codes() -> Tensor``, the integer code of each weight element under the current scale (an integer
dtype), same shape as the weight. A new grid registers a `FakeQuantizer` subclass with ``@QUANTIZERS.register``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.registry import Registry
from keel.nn._surgery import adapter_factors, set_submodule

# A code that no grid uses: the code of every element of a group that holds a NaN or ±Inf (no scale exists).
NO_CODE = -1
# Qualified names of the layers `fake_quantize` leaves in full precision unless told otherwise: the output head,
# as Stable-SPAM's INT4 runs do (they quantize the q/k/v/o/gate/up/down projections only).
OUTPUT_HEADS = ("head", "lm_head", "*.lm_head")


class FakeQuantizer(nn.Module):
    """A quantization grid: ``quantize(x)`` gives the integer codes and the dequantized values of ``x``;
    calling the module gives the dequantized values with the straight-through gradient (d out / d x = 1).

    Subclasses implement `quantize`; one whose gradient is not the plain STE (a clipped or annealed one)
    overrides `forward` too.
    """

    name: ClassVar[str] = ""

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, values): the integer code of each element (an integer tensor, ``x``'s shape) and its
        dequantized value (``x``'s shape and dtype). No gradient flows through either."""
        raise NotImplementedError

    def dequantized(self, x: Tensor) -> Tensor:
        """The dequantized values alone (what the forward needs); a grid whose codes cost extra work overrides it."""
        return self.quantize(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            values = self.dequantized(x.detach())
        # values in the forward, identity in the backward: the straight-through estimator
        return values + (x - x.detach())

    def check(self, weight: Tensor) -> str | None:
        """Why this grid cannot quantize ``weight`` (e.g. its size is not a multiple of the group), or None."""
        return None


QUANTIZERS: Registry[FakeQuantizer] = Registry("quantizer")


def list_quantizers() -> list[str]:
    """Names of the registered fake quantizers (``fake_quantize(model, name)``)."""
    return QUANTIZERS.names()


def create_quantizer(name: str, **options: Any) -> FakeQuantizer:
    """The quantizer registered as ``name``, built with ``options``."""
    return QUANTIZERS.create(name, **options)


@QUANTIZERS.register("minmax")
class MinMaxQuantizer(FakeQuantizer):
    """Asymmetric min–max quantization per group of consecutive elements: Stable-SPAM's INT4 weight grid.

    The tensor is flattened (row-major) and cut into groups of ``group_size`` elements, so a group spans
    several rows when a row is shorter than the group. Per group, with ``top = 2**bits - 1`` (15 for 4 bits):

    * ``scale = max(max(x) - min(x), min_scale) / top``
    * ``zero = clamp(-round(min(x) / scale), 0, top)``
    * ``code = clamp(round(x / scale) + zero, 0, top)`` and ``value = (code - zero) · scale``

    ``round`` is round-half-to-even (``torch.round``). The arithmetic runs in float32 whatever the weight's
    dtype; the values are cast back to it.

    Behaviour worth knowing, all the reference's own:

    * the zero point is clamped to the grid, so a group whose values are all of one sign cannot place its
      grid around them: all-positive values are clamped to ``[0, max - min]``, e.g. a group in [1, 2] all
      becomes 1.0 (and an all-negative group [−2, −1] becomes [−1, 0]);
    * a constant group has range 0, so its scale is ``min_scale / top``: a constant c > 0 becomes
      ``min_scale`` (1e-5), c < 0 becomes ``-min_scale``... only 0 stays exact;
    * a group holding a NaN or ±Inf has no scale: its values are NaN (the fault stays visible to keel's
      non-finite detectors) and its codes `NO_CODE`. The reference asserts there are no NaNs instead.

    Args:
        bits: Bits per code (codes 0 .. 2**bits − 1); the reference's INT4 runs use 4.
        group_size: Elements per group (the reference's ``weight_group_size``, 256); the quantized tensor's
            size must be a multiple of it.
        min_scale: Floor of ``max − min`` before the division by ``top`` (the reference's 1e-5).

    References:
        Huang et al. (2025), "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam", arXiv 2502.17055;
        official code TianjinYellow/StableSPAM ``utils/fake_quantization.py`` (``_quantize_tensor``, ``QLinear``).
    """

    name: ClassVar[str] = "minmax"

    def __init__(self, *, bits: int = 4, group_size: int = 256, min_scale: float = 1e-5) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"MinMaxQuantizer.bits={bits!r}; allowed: an integer from 1 to 8")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"MinMaxQuantizer.group_size={group_size!r}; allowed: an integer >= 1")
        if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale < math.inf:
            raise ValueError(f"MinMaxQuantizer.min_scale={min_scale!r}; allowed: a finite number > 0")
        self.bits, self.group_size, self.min_scale = bits, group_size, float(min_scale)

    def check(self, weight: Tensor) -> str | None:
        if weight.numel() % self.group_size:
            return f"{weight.numel()} elements are not a multiple of group_size={self.group_size}"
        return None

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        groups, codes, zero, scale = self._grid(x)
        values = (codes - zero) * scale  # NaN over a group with a NaN or ±Inf: its scale is NaN or inf
        codes = codes.masked_fill(~torch.isfinite(groups).all(dim=1, keepdim=True), NO_CODE)
        return codes.to(torch.int16).reshape(x.shape), values.to(x.dtype).reshape(x.shape)

    def dequantized(self, x: Tensor) -> Tensor:
        _, codes, zero, scale = self._grid(x)  # the codes' finiteness mask and integer cast are not needed here
        return ((codes - zero) * scale).to(x.dtype).reshape(x.shape)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(groups in float32, codes as floats, zero point, scale) of each group of ``group_size`` elements."""
        if (reason := self.check(x)) is not None:
            raise ValueError(f"MinMaxQuantizer cannot quantize a tensor of shape {tuple(x.shape)}: {reason}")
        top = 2**self.bits - 1
        groups = x.detach().reshape(-1, self.group_size).float()
        low = groups.amin(dim=1, keepdim=True)
        high = groups.amax(dim=1, keepdim=True)
        scale = (high - low).clamp(min=self.min_scale) / top
        zero = (-torch.round(low / scale)).clamp(0, top)
        codes = (torch.round(groups / scale) + zero).clamp(0, top)
        return groups, codes, zero, scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, min_scale={self.min_scale:g}"


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses fake-quantized weights (and inputs): ``y = q_in(x)·q_w(W)ᵀ + b``.

    It shares the converted layer's weight and bias Parameters (no copy), so an optimizer built before the
    surgery keeps training them, and the state dict keeps the layer's keys (plus the quantizers' buffers, if any).

    Attributes:
        weight_quantizer: The weights' grid.
        input_quantizer: The inputs' grid, or None for full-precision inputs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quantizer: FakeQuantizer,
        input_quantizer: FakeQuantizer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, weight_quantizer: FakeQuantizer, input_quantizer: FakeQuantizer | None = None
    ) -> FakeQuantLinear:
        """A fake-quantized layer sharing ``linear``'s weight and bias Parameters."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        layer.train(linear.training)
        return layer

    def quantized_codes(self) -> Tensor:
        """The integer code of each weight element under the current scale (an integer tensor, the weight's shape)."""
        with torch.no_grad():
            return self.weight_quantizer.quantize(self.weight)[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def fake_quantize(
    model: nn.Module,
    name: str = "minmax",
    *,
    exclude: Sequence[str] = OUTPUT_HEADS,
    inputs: str | None = None,
    input_options: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a `FakeQuantLinear` on the grid ``name``.

    Use it as a proxy ``TrainConfig.model_fn`` or on your own model before building the optimizer (the Parameters
    are shared, so one built before works too). Left in full precision: the layers matching an ``exclude``
    pattern (fnmatch on qualified names; by default the output head), the factors of peft adapters, and layers
    the grid cannot cut (a size that is not a multiple of the group): those are named in one warning.

    Args:
        model: The model to convert, in place.
        name: The weight grid (`list_quantizers`).
        exclude: fnmatch patterns of qualified module names to leave alone.
        inputs: A grid for the layers' inputs too (activation quantization), or None.
        input_options: Options of the input grid.
        **options: Options of the weight grid, e.g. ``group_size=128``.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown grid or option, or no layer left to quantize.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> _ = fake_quantize(model, "minmax", group_size=16, exclude=())
        >>> type(model[0]).__name__, model[0].quantized_codes().shape
        ('FakeQuantLinear', torch.Size([16, 16]))
    """
    if type(model) is nn.Linear:
        raise ValueError("fake_quantize: model is an nn.Linear itself; allowed: a model containing them")
    weight_grid = create_quantizer(name, **options)
    input_grid = None if inputs is None else create_quantizer(inputs, **(input_options or {}))
    factors = adapter_factors(model)
    converted: list[str] = []
    left: list[str] = []
    for qualified, module in list(model.named_modules()):
        if type(module) is not nn.Linear or id(module) in factors:  # subclasses (already converted, ...) stay
            continue
        if any(fnmatch.fnmatchcase(qualified, pattern) for pattern in exclude):
            continue
        if (reason := weight_grid.check(module.weight)) is not None:
            left.append(f"{qualified} ({reason})")
            continue
        layer = FakeQuantLinear.from_linear(
            module, weight_quantizer=copy.deepcopy(weight_grid), input_quantizer=copy.deepcopy(input_grid)
        )
        set_submodule(model, qualified, layer)
        converted.append(qualified)
    if left:
        warnings.warn(f"fake_quantize: left in full precision: {', '.join(left)}", stacklevel=2)
    if not converted:
        raise ValueError(
            f"fake_quantize: no nn.Linear left to quantize in {type(model).__name__} "
            f"(exclude={tuple(exclude)!r}); allowed: a model with at least one nn.Linear not excluded"
        )
    return model


def fake_quantized_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """The fake-quantized layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
