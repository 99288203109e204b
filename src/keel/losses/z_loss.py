"""z-loss: a small penalty on log Z of the output softmax that keeps output logits from drifting.

From PaLM (Chowdhery et al. 2022, §5) and "Small-scale proxies for large-scale Transformer training
instabilities" (Wortsman et al. 2023, arXiv 2309.14322), where it removes output-logit divergence.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from keel.losses._checks import is_number

DEFAULT_COEFFICIENT = 1e-4


def log_partition(logits: Tensor) -> Tensor:
    """log Z = logsumexp over the last (vocabulary) axis, computed in float32 or wider.

    Half-precision logits are upcast first: log Z of a large vocabulary loses several bits in bf16.

    Args:
        logits: ``(..., vocab)`` scores of any floating dtype.

    Returns:
        ``(...)`` log Z, float32 (float64 stays float64).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.logsumexp(logits, dim=-1)


def z_loss_from_log_z(log_z: Tensor, *, coefficient: float = DEFAULT_COEFFICIENT, mask: Tensor | None = None) -> Tensor:
    """``coefficient · mean(log Z²)`` over the tokens selected by ``mask`` (all tokens when None).

    Use it when log Z is already at hand, e.g. recorded by `keel.nn.ZLossHook`.

    Args:
        log_z: ``(...)`` log partition values.
        coefficient: Weight of the penalty (PaLM and Wortsman et al.: 1e-4).
        mask: Optional boolean ``(...)`` tensor, True for tokens that count (e.g. not padding).

    Returns:
        A 0-d tensor. An empty batch or an all-False mask gives 0 (not NaN), so padding-only batches are safe.
        A masked-out token counts for nothing, even with a NaN or infinite log Z (a fully masked attention row
        under left padding gives NaN logits; 0·NaN was NaN).

    Raises:
        ValueError: ``coefficient`` is negative or not finite, or ``mask`` has the wrong shape.
    """
    check_coefficient(coefficient)
    if mask is None:
        # sum / max(n, 1) rather than mean(): an empty batch gives 0, not NaN.
        return coefficient * log_z.square().sum() / max(log_z.numel(), 1)
    _check_mask(mask, log_z.shape)
    weights = mask.to(log_z.dtype)
    # chosen before squaring: never 0 · NaN or 0 · inf, in the value or in the gradient to log Z (square's
    # backward 2·log Z·0 was NaN at a NaN token)
    squared = torch.where(weights != 0, log_z, 0.0).square()
    # clamp_min keeps an all-padding batch at 0 instead of 0/0.
    return coefficient * (squared * weights).sum() / weights.sum().clamp_min(1.0)


def masked_log_partition(logits: Tensor, mask: Tensor) -> Tensor:
    """`log_partition` of the tokens ``mask`` selects and 0 at the others, whose gradient there is exactly 0.

    Autograd's logsumexp backward multiplies the incoming gradient by softmax(row): NaN for a NaN or all −inf
    row, and 0·NaN = NaN, so a masked-out padding row poisoned the logits' gradient. No copy of the logits is
    made (a ``masked_fill`` first would keep one alive until backward).

    Args:
        logits: ``(..., vocab)`` scores of any floating dtype.
        mask: ``(...)`` tensor, True (non-zero) for tokens that count.

    Returns:
        ``(...)`` log Z, float32 (float64 stays float64), 0 where ``mask`` is False.

    Raises:
        ValueError: ``mask`` does not have the logits' leading shape.
    """
    _check_mask(mask, logits.shape[:-1])
    return _MaskedLogPartition.apply(logits, mask != 0)


def maskable_log_partition(logits: Tensor) -> Tensor:
    """`log_partition` of every token, for a loss that masks tokens later (`keel.nn.ZLossHook`): a token whose
    log Z then gets no gradient (``mask`` False in `z_loss_from_log_z`) passes exactly 0 to its logits, even
    when its row is NaN or all −inf, where autograd's logsumexp gave 0·NaN = NaN. A counted token's gradient is
    softmax(row) times the incoming one, as ever. No copy of the logits is made."""
    return _MaskedLogPartition.apply(logits, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device))


class _MaskedLogPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, counted: Tensor) -> Tensor:
        log_z = torch.where(counted, log_partition(logits), 0.0)
        ctx.save_for_backward(logits, log_z, counted)
        return log_z

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        logits, log_z, counted = ctx.saved_tensors  # type: ignore[attr-defined]
        # ∂ log Z/∂x = softmax(x) on counted rows; the others get 0 (their softmax may be NaN), and so does a row
        # whose incoming gradient is 0 (a token the loss left out after log Z was taken: `maskable_log_partition`)
        counted = counted & (grad != 0)
        probs = torch.sub(logits.to(log_z.dtype), log_z.unsqueeze(-1)).exp_()
        probs.mul_(torch.where(counted, grad, 0.0).unsqueeze(-1)).masked_fill_(~counted.unsqueeze(-1), 0.0)
        return probs.to(logits.dtype), None


def _check_mask(mask: Tensor, tokens: torch.Size) -> None:
    if mask.shape != tokens:
        raise ValueError(f"mask.shape={tuple(mask.shape)}; allowed: the logits' leading shape {tuple(tokens)}")


def z_loss(logits: Tensor, *, coefficient: float = DEFAULT_COEFFICIENT, mask: Tensor | None = None) -> Tensor:
    """The z-loss of a batch of output logits: ``coefficient · mean over tokens of (logsumexp(logits))²``.

    Add it to the task loss. It pulls log Z towards 0, so the softmax stays normalised without the logits
    having to drift; its gradient is ``2·coefficient·log Z·softmax(logits) / n_tokens``.

    Args:
        logits: ``(..., vocab)`` output scores.
        coefficient: Weight of the penalty; 1e-4 as in PaLM and Wortsman et al.
        mask: Optional boolean ``(...)`` tensor, True for tokens that count. Masked-out tokens count for
            nothing in value and gradient, whatever their logits (NaN, all −inf).

    Returns:
        A 0-d float32 tensor (float64 for float64 logits).

    Example:
        >>> logits = torch.zeros(2, 3, 5)
        >>> round(z_loss(logits).item() / 1e-4, 4)  # log Z = log 5 for uniform logits
        2.5903

    References:
        Chowdhery et al. (2022), "PaLM: Scaling Language Modeling with Pathways", arXiv 2204.02311, §5.
        Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities",
        arXiv 2309.14322. No official code; OLMo-core ``nn/functional/cross_entropy_loss.py`` implements
        the same mean of logsumexp².
    """
    log_z = log_partition(logits) if mask is None else masked_log_partition(logits, mask)
    return z_loss_from_log_z(log_z, coefficient=coefficient, mask=mask)


def check_coefficient(coefficient: object, name: str = "coefficient") -> None:
    """Raise ValueError naming ``name`` unless ``coefficient`` is a finite number >= 0 (the z-loss weight)."""
    if not (is_number(coefficient) and coefficient >= 0):  # type: ignore[operator]
        raise ValueError(f"{name}={coefficient!r}; allowed: a finite number >= 0")
