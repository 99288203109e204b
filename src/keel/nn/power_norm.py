"""PowerNorm: batch normalisation by a running quadratic mean, with an approximate backward pass.

From Shen et al. (2020), "PowerNorm: Rethinking Batch Normalization in Transformers" (ICML 2020,
arXiv 2003.07845).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from keel.losses._checks import is_int, is_number

_GROUP_EPS = 1e-5  # the official GroupScaling1D's fixed eps
_HALF = (torch.float16, torch.bfloat16)  # normalised in float32: x² of |x| > 256 overflows float16
_STATISTICS = ("running_phi", "ema_gz")  # kept float32 whatever dtype the module is moved to


def group_scaling(x: Tensor, groups: int) -> Tensor:
    """Divide each token's features, in ``groups`` contiguous groups, by their root mean square.

    The official code applies this before PowerNorm (``GroupScaling1D``, groups = attention heads); the
    paper does not mention it.
    """
    shape = x.shape
    grouped = x.reshape(*shape[:-1], groups, shape[-1] // groups)  # (..., groups, C/groups)
    scale = torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + _GROUP_EPS)
    return (grouped * scale).reshape(shape)


class _PowerFunction(torch.autograd.Function):
    """Forward: y = γ·x/sqrt(stat + eps). Backward: the approximate rule with the running Γ (``ema_gz``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        valid: Tensor | None,
        used: Tensor,
        ema_gz: Tensor,
        alpha_bkw: float,
        divisor_stat: Tensor,
        eps: float,
    ) -> Tensor:
        z = x / torch.sqrt(used + eps)
        ctx.save_for_backward(z, weight, valid, ema_gz, divisor_stat)
        ctx.alpha_bkw, ctx.eps = alpha_bkw, eps
        return z * weight + bias

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        z, weight, valid, ema_gz, divisor_stat = ctx.saved_tensors
        g = grad_out * weight
        approx = g - (1.0 - ctx.alpha_bkw) * ema_gz * z
        with torch.no_grad():
            ema_gz.add_(_valid_mean(approx * z, valid))
        grad_x = approx / torch.sqrt(divisor_stat + ctx.eps)
        reduce_dims = tuple(range(grad_out.dim() - 1))
        grad_weight = (grad_out * z).sum(dim=reduce_dims)
        grad_bias = grad_out.sum(dim=reduce_dims)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


@torch._disable_dynamo
def _apply_power_function(*args: Any) -> Tensor:
    """`_PowerFunction` run eagerly, also inside a ``torch.compile``'d model (one graph break there): traced, its
    backward — which updates the running Γ in place — came out wrong under inductor (a 2-D input's gradient 17 %
    off from the first step after warm-up, /tmp/h27X/c12_powernorm_inductor.py), while ``aot_eager`` was exact."""
    return _PowerFunction.apply(*args)


def _valid_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Per-channel mean of ``values`` (..., C) over the tokens where ``valid`` (..., 1) is True (all when None): a
    padded token's value, even NaN or ±Inf, is left out (a product with 0 would keep NaN)."""
    if valid is None:
        return values.reshape(-1, values.shape[-1]).mean(dim=0)
    total = torch.where(valid, values, 0.0).reshape(-1, values.shape[-1]).sum(dim=0)
    return total / valid.sum().clamp_min(1)


class PowerNorm(nn.Module):
    """Power normalisation over the last (feature) axis of ``(..., C)`` inputs, with a padding mask.

    Use it in place of LayerNorm/BatchNorm in a Transformer encoder when batch statistics fluctuate too
    much for BatchNorm: there is no mean subtraction, and after ``warmup_iters`` the forward divides by a
    running quadratic mean φ instead of the batch's ψ², so one odd batch cannot swing the output.

    Training, per channel: ψ² = mean of x² over non-padded tokens. During warm-up z = x/sqrt(ψ² + ε) and φ is
    a cumulative average of ψ² followed by an EMA step; afterwards z = x/sqrt(φ + ε) and
    φ ← α_f·φ + (1−α_f)·ψ². y = γ·z + β. The backward replaces the exact gradient by
    g̃ = γ·∂L/∂y − (1−α_b)·Γ·z with Γ ← Γ + mean(g̃·z), divided by the same statistic the forward used.
    Eval: z = x/sqrt(φ + ε). float16 and bfloat16 inputs are normalised in float32 and returned in their own
    dtype; φ and Γ stay float32 when the module is moved to a half dtype.

    keel's decisions where paper and official code differ:
        * After warm-up the official backward divides by the *batch* sqrt(ψ² + ε) although the forward
          divided by sqrt(φ + ε); keel divides by the forward's statistic (``reference_backward=True``
          restores the official code).
        * The mean in the Γ update skips padded tokens (the official code averages over them too).
        * The official ``GroupScaling1D`` pre-scaling is kept (``groups``, default 1 = RMS per token);
          ``groups=None`` turns it off.

    Args:
        num_features: C.
        eps: ε (1e-5).
        alpha_fwd: α_f of φ's EMA (0.9).
        alpha_bkw: α_b of the backward correction (0.9).
        affine: Learn γ and β.
        warmup_iters: Training forwards that use batch statistics (the recipe: the LR warm-up, 8000).
        groups: Groups of the per-token pre-scaling (official: number of heads); None disables it.
        reference_backward: Divide the backward by the batch statistic after warm-up, as the official code.

    Example:
        >>> pn = PowerNorm(8, warmup_iters=2)
        >>> pn(torch.randn(4, 5, 8)).shape
        torch.Size([4, 5, 8])

    References:
        Shen, Yao, Gholami, Mahoney, Keutzer (2020), "PowerNorm: Rethinking Batch Normalization in
        Transformers", arXiv 2003.07845. Official code: sIncerass/powernorm
        ``fairseq/modules/norms/mask_powernorm.py`` (``MaskPowerNorm``, ``PowerFunction``).
    """

    # Buffers, declared for the type checker (nn.Module's attribute lookup is typed Tensor | Module).
    running_phi: Tensor
    ema_gz: Tensor
    iters: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        affine: bool = True,
        warmup_iters: int = 10000,
        groups: int | None = 1,
        reference_backward: bool = False,
    ) -> None:
        super().__init__()
        if not is_int(num_features) or num_features < 1:
            raise ValueError(f"PowerNorm.num_features={num_features!r}; allowed: a positive int")
        for name, value in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not (is_number(value) and 0 <= value <= 1):
                raise ValueError(f"PowerNorm.{name}={value!r}; allowed: a number in [0, 1]")
        if not (is_number(eps) and eps > 0):
            raise ValueError(f"PowerNorm.eps={eps!r}; allowed: a finite number > 0")
        if not is_int(warmup_iters) or warmup_iters < 0:
            raise ValueError(f"PowerNorm.warmup_iters={warmup_iters!r}; allowed: an int >= 0")
        if groups is not None and (not is_int(groups) or groups < 1 or num_features % groups):
            raise ValueError(f"PowerNorm.groups={groups!r}; allowed: None or a positive divisor of {num_features}")
        for name, flag in (("affine", affine), ("reference_backward", reference_backward)):
            if not isinstance(flag, bool):
                raise ValueError(f"PowerNorm.{name}={flag!r}; allowed: True or False")
        self.num_features, self.eps = num_features, float(eps)
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        self.warmup_iters, self.groups, self.reference_backward = warmup_iters, groups, reference_backward
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=affine)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=affine)
        self.register_buffer("running_phi", torch.ones(num_features))
        self.register_buffer("ema_gz", torch.zeros(num_features))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))

    def _apply(self, fn: Any, recurse: bool = True) -> PowerNorm:
        """As ``nn.Module._apply``, except that a cast to float16/bfloat16 leaves φ and Γ float32 (on the new
        device): their values are never rounded to half precision."""
        before = {name: self._buffers[name] for name in _STATISTICS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype in _HALF and old.dtype not in _HALF:
                self._buffers[name] = old.to(new.device)
        return self

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Normalise ``x`` (..., C); ``pad_mask`` (...) is True at padded tokens, which get no statistics."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"input's last axis is {x.shape[-1]}; allowed: num_features={self.num_features}")
        if pad_mask is not None and pad_mask.shape != x.shape[:-1]:
            raise ValueError(f"pad_mask.shape={tuple(pad_mask.shape)}; allowed: {tuple(x.shape[:-1])}")
        if pad_mask is not None and pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask.dtype={pad_mask.dtype}; allowed: torch.bool (True at padded tokens)")
        if x.dtype in _HALF:
            return self._normalise(x.float(), pad_mask).to(x.dtype)
        return self._normalise(x, pad_mask)

    def _normalise(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.groups is not None:
            x = group_scaling(x, self.groups)
        if not self.training:
            return x / torch.sqrt(self.running_phi + self.eps) * weight + bias
        valid = None if pad_mask is None else (~pad_mask).unsqueeze(-1)  # (..., 1)
        with torch.no_grad():
            batch_sq = _valid_mean(x.detach().square(), valid)  # ψ², (C,)
            self.iters.add_(1)
            used, divisor = self._update_statistics(batch_sq, self.iters.to(torch.float64))
        return _apply_power_function(x, weight, bias, valid, used, self.ema_gz, self.alpha_bkw, divisor, self.eps)

    def _update_statistics(self, batch_sq: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """Advance φ with this batch's ψ² at the 1-based training forward ``step`` (a 0-d float64 tensor); returns the
        statistic the forward divides by and the one the backward divides by.

        Everything is tensor arithmetic on the device: no host read, and no Python number that changes from one
        forward to the next, which ``torch.compile`` would bake into the graph (a recompile per training step, and
        the warm-up's two tensors in one slot broke the graph: ``autograd.Function.apply: duplicate tensor input``).
        """
        warm = step <= self.warmup_iters
        used = torch.where(warm, batch_sq, self.running_phi)
        divisor = batch_sq.clone() if self.reference_backward else torch.where(warm, batch_sq, self.running_phi)
        # warm-up: φ is the cumulative average of ψ² (then the EMA step below); float64 ratios, as Python's were
        averaged = self.running_phi * ((step - 1) / step) + batch_sq / step
        self.running_phi.copy_(torch.where(step < self.warmup_iters, averaged, self.running_phi))
        self.running_phi.mul_(self.alpha_fwd).add_((1.0 - self.alpha_fwd) * batch_sq)
        return used, divisor

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"warmup_iters={self.warmup_iters}, groups={self.groups}"
        )
