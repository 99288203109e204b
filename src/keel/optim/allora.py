"""ALLoRA: scale each LoRA parameter's gradient by 1/sqrt(‖θ‖² + 1/η²), a gradient transform for any optimizer.

After Huang & Balestriero (2024), "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692.
No official code exists; the exact form is not confirmed from the paper's method section (see `ALLoRA`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from keel._core.errors import KeelWarning
from keel.optim._helpers import params_with_grad

GRANULARITIES = ("row", "matrix")

# peft's names for the two low-rank factors of a LoRA layer (Linear/Conv use lora_A/lora_B, Embedding the others).
_PEFT_FACTORS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


class NoLoRAFoundWarning(KeelWarning):
    """`apply_allora` found no peft LoRA layer in the model: nothing was changed."""


def allora_coefficients(param: Tensor, *, eta: float, granularity: str = "row") -> Tensor:
    """The ALLoRA gradient multipliers of one parameter: c = 1 / sqrt(‖θ‖² + 1/η²).

    ``"row"`` gives one coefficient per row of ``param`` (per output channel of peft's ``lora_B``, per rank
    component of ``lora_A``), ``"matrix"`` one for the whole tensor. c is η where θ = 0 (B at its zero init),
    and falls like 1/‖θ‖ as the adapter grows. A row holding NaN or ±Inf gets c = 1: its gradient passes
    unchanged, so keel's non-finite checks see the real state instead of a NaN spread (or a 0 that hides it).

    Args:
        param: The parameter (any shape; a 0-d or 1-d tensor is a single row).
        eta: η > 0, the bound of c (reached at θ = 0).
        granularity: ``"row"`` or ``"matrix"``.

    Returns:
        Coefficients (float64 for a float64 param, float32 otherwise) of shape ``(rows, 1)`` for ``"row"``
        (``rows = param.shape[0]``, 1 for a 0-d or 1-d param) or ``(1, 1)`` for ``"matrix"``, on ``param``'s
        device.
    """
    rows = _as_rows(param.detach(), granularity)  # (rows, entries)
    # Norms in float32 (float64 kept) so bf16/fp16 squares lose no precision. vector_norm squares unscaled, so
    # a huge finite row (|θ| > 1e19 in float32) would give ‖θ‖ = inf and c = 0: divide by the row's max |θ|
    # first; hypot then keeps ‖θ‖² + 1/η² from overflowing too.
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    peak = rows.abs().amax(dim=1, keepdim=True).to(acc).clamp_min(torch.finfo(acc).tiny)
    norms = torch.linalg.vector_norm(rows.to(acc) / peak, dim=1, keepdim=True) * peak
    coeff = torch.hypot(norms, torch.tensor(1.0 / eta, dtype=acc, device=norms.device)).reciprocal()
    finite = torch.isfinite(rows).all(dim=1, keepdim=True)
    return torch.where(finite, coeff, torch.ones_like(coeff))


def allora_scale_(grad: Tensor, param: Tensor, *, eta: float, granularity: str = "row") -> Tensor:
    """Multiply ``grad`` in place by `allora_coefficients` of ``param``; returns ``grad``."""
    coeff = allora_coefficients(param, eta=eta, granularity=granularity)
    rows = _as_rows(grad, granularity)
    if grad.is_contiguous():  # rows is a view: scale in place
        rows.mul_(coeff.to(grad.dtype))
    else:  # rows is a copy: write the scaled values back
        grad.copy_((rows * coeff.to(grad.dtype)).reshape(grad.shape))
    return grad


class ALLoRA:
    """ALLoRA's adaptive learning rate as a gradient transform, for any optimizer (AdamW in the paper's setting).

    Use it on a LoRA fine-tune whose adapters have no dropout and no α/r scaling (`apply_allora` sets both on a
    peft model, or build it with ``LoraConfig(lora_alpha=r, lora_dropout=0.0)``). Between ``backward()`` and
    ``optimizer.step()`` each LoRA parameter's gradient is multiplied by c = 1/sqrt(‖θ‖² + 1/η²): large (η)
    while B is near its zero init, so B leaves 0 fast, and ≈ 1/‖θ‖ once the adapter has grown, a brake that
    acts as an implicit regulariser. Gradients are changed in place; the gradient that flows to earlier layers
    during backward is untouched (the scaling happens after it). The coefficient depends on the weights only,
    so scaling the batch gradient equals the paper's per-sample scaling.

    With Adam-type optimizers a constant per-row factor cancels in m/√v: what acts is the change of c over
    time (v remembers the larger early gradients, so the update shrinks as ‖θ‖ grows), plus the removal of
    α/r, which on its own makes each step move ΔW = B·A by α/r times less than LoRA's at the same LR.

    The form implemented, and what is not confirmed (the paper's method section could not be read here):

    * c = 1/sqrt(‖θ‖² + 1/η²): "inversely proportional to the parameters' ℓ2 norm" (the abstract) for large
      ‖θ‖, bounded by η at 0. Two third-party re-implementations use sqrt(‖·‖ + 1/η²) (norm not squared,
      c ≈ ‖θ‖^-1/2), which does not match the abstract's wording; one of them takes the norm per output row of
      the product B·A and scales the output gradient before A's and B's gradients are formed.
    * Granularity: per row of each factor by default (both re-implementations use rows); ``"matrix"`` is offered.
    * η: the paper's value is unknown here; the default 2.0 is the one re-implementation default found.

    Args:
        params: The LoRA parameters (peft's ``lora_A``/``lora_B`` weights; `ALLoRA.for_peft` collects them).
        eta: η > 0, the largest multiplier (at θ = 0).
        granularity: ``"row"`` (default) or ``"matrix"``.

    Raises:
        ValueError: an empty parameter list, a non-tensor parameter, η not a finite number > 0, or an unknown
            granularity.

    Example:
        >>> base = torch.nn.Linear(4, 2)
        >>> lora_a = torch.nn.Parameter(torch.randn(2, 4)); lora_b = torch.nn.Parameter(torch.zeros(2, 2))
        >>> opt = torch.optim.AdamW([lora_a, lora_b], lr=1e-3)
        >>> handle = ALLoRA([lora_a, lora_b]).attach(opt)   # or call .scale_() before opt.step()
        >>> x = torch.randn(8, 4)
        >>> (base(x) + x @ lora_a.T @ lora_b.T).square().mean().backward()
        >>> opt.step()

    References:
        Huang & Balestriero (2024), "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
        arXiv 2410.09692 (OpenReview 7X65yoKl3Y). No official code.
    """

    def __init__(self, params: Iterable[Tensor], *, eta: float = 2.0, granularity: str = "row") -> None:
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"ALLoRA.eta={eta!r}; allowed: a finite number > 0")
        if granularity not in GRANULARITIES:
            raise ValueError(f"ALLoRA.granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        self.params = list(params)
        if not self.params:
            raise ValueError("ALLoRA got an empty parameter list; allowed: at least one LoRA parameter")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise ValueError(f"ALLoRA params[{i}] is a {type(p).__name__}; allowed: tensors (parameters)")
        self.eta = float(eta)
        self.granularity = granularity

    @classmethod
    def for_peft(cls, model: nn.Module, **kwargs: Any) -> ALLoRA:
        """ALLoRA over every trainable peft LoRA factor of ``model`` (``lora_A``, ``lora_B``, embedding ones).

        Raises:
            ValueError: the model has no trainable peft LoRA parameter.
        """
        params = [p for name, p in model.named_parameters() if p.requires_grad and _is_lora_factor(name)]
        if not params:
            raise ValueError(
                f"ALLoRA.for_peft found no trainable LoRA parameter in {type(model).__name__}; allowed: a model "
                "with peft LoRA adapters (parameter names containing .lora_A. or .lora_B.)"
            )
        return cls(params, **kwargs)

    @torch.no_grad()
    def scale_(self) -> None:
        """Multiply every gradient in place by its ALLoRA coefficients; parameters without a gradient are skipped.

        Raises:
            ValueError: A sparse gradient or a complex parameter (before, torch's "reshape is not implemented for
                sparse tensors", and a complex parameter's coefficients silently from its real part), named with its
                shape; no gradient is scaled then.
        """
        for p in params_with_grad({"params": self.params}, "ALLoRA"):
            allora_scale_(p.grad, p, eta=self.eta, granularity=self.granularity)  # type: ignore[arg-type]

    def attach(self, optimizer: Optimizer) -> RemovableHandle:
        """Run `scale_` before every ``optimizer.step()`` (a step pre-hook); returns the hook's handle.

        Attach it after any gradient clipping you want on the raw gradients: the hook runs inside ``step()``.
        """

        def hook(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.scale_()

        return optimizer.register_step_pre_hook(hook)


def apply_allora(model: nn.Module) -> int:
    """Set every peft LoRA layer of ``model`` to ALLoRA's layout: α/r scaling 1, dropout the identity.

    Also rewrites each adapter's ``peft_config`` (``lora_alpha = r``, ``alpha_pattern`` = ``rank_pattern``,
    ``use_rslora = False``, ``lora_dropout = 0``) so a saved adapter reloads with scaling 1. Equivalent for a new
    model: ``LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0)``. peft itself is not imported: layers are found by
    their ``lora_A``/``scaling``/``lora_dropout`` attributes.

    Returns:
        The number of (layer, adapter) pairs changed; 0 (with a `NoLoRAFoundWarning`) when the model has none.
    """
    changed = 0
    for module in model.modules():
        scaling, dropout = getattr(module, "scaling", None), getattr(module, "lora_dropout", None)
        if not (isinstance(scaling, dict) and isinstance(dropout, nn.ModuleDict) and hasattr(module, "lora_A")):
            continue
        for adapter in list(scaling):
            scaling[adapter] = 1.0
            if adapter in dropout:
                dropout[adapter] = nn.Identity()
            ranks, alphas = getattr(module, "r", {}), getattr(module, "lora_alpha", {})
            if adapter in ranks and isinstance(alphas, dict):
                alphas[adapter] = ranks[adapter]
            rslora = getattr(module, "use_rslora", None)
            if isinstance(rslora, dict) and adapter in rslora:
                rslora[adapter] = False
            changed += 1
    for config in (getattr(model, "peft_config", None) or {}).values():
        if hasattr(config, "lora_alpha") and hasattr(config, "r"):
            config.lora_alpha = config.r
            config.alpha_pattern = dict(getattr(config, "rank_pattern", None) or {})
            config.use_rslora = False
            config.lora_dropout = 0.0
    if changed == 0:
        warnings.warn(
            f"apply_allora found no peft LoRA layer in {type(model).__name__}; nothing was changed",
            NoLoRAFoundWarning,
            stacklevel=2,
        )
    return changed


def _is_lora_factor(name: str) -> bool:
    return any(tag in f".{name}." for tag in _PEFT_FACTORS)


def _as_rows(tensor: Tensor, granularity: str) -> Tensor:
    """A ``(rows, entries)`` view of ``tensor``: one row per ``shape[0]`` slice, or one row for ``"matrix"``."""
    if granularity == "matrix" or tensor.dim() <= 1:
        return tensor.view(1, -1) if tensor.is_contiguous() else tensor.reshape(1, -1)
    return tensor.view(tensor.shape[0], -1) if tensor.is_contiguous() else tensor.reshape(tensor.shape[0], -1)
