"""Pure tensor statistics of output logits: log-partition, scale, softmax collapse and zero-loss fraction.

- log Z = logsumexp over the vocabulary, per row. z-loss (PaLM, Chowdhery et al. 2022; Wortsman et al.
  2023) penalises (log Z)²; "output-logit divergence" is log Z drifting far from 0.
- Softmax Collapse (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697;
  code github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability, ``logger.py``): in the
  softmax's working precision, S = Σⱼ exp(zⱼ − max z) equals 1 exactly when every other term is absorbed;
  the row's gradient then vanishes. The SC fraction is the share of rows with S == 1. Its companion
  ``zero_terms`` is the share of rows whose loss is exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from keel.losses.z_loss import log_partition as _log_partition


def log_partition(logits: Tensor) -> Tensor:
    """log Z per row, measured: `keel.losses.log_partition` of the detached logits (no training graph).

    Example:
        >>> log_partition(torch.zeros(2, 4))
        tensor([1.3863, 1.3863])
    """
    return _log_partition(logits.detach())


def softmax_collapse_mask(logits: Tensor, precision: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per row: (S == 1 exactly, S) with S = Σⱼ exp(zⱼ − max z) computed in ``precision``.

    Args:
        logits: Logits, classes last.
        precision: The softmax's working precision; default: the logits' dtype (the reference casts to
            its ``--softmax_precision`` first, as here).

    Example:
        >>> collapsed, _ = softmax_collapse_mask(torch.tensor([[0.0, -200.0], [0.0, -1.0]]))
        >>> collapsed
        tensor([ True, False])
    """
    z = logits.detach()
    if precision is not None:
        z = z.to(precision)
    s = torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)
    return s == 1, s


def softmax_collapse_fraction(logits: Tensor, precision: torch.dtype | None = None) -> Tensor:
    """Share of rows in Softmax Collapse (0-d float32); NaN for no rows.

    Example:
        >>> softmax_collapse_fraction(torch.tensor([[0.0, -200.0], [0.0, -1.0]]))
        tensor(0.5000)
    """
    collapsed, _ = softmax_collapse_mask(logits, precision)
    return collapsed.float().mean()


def zero_loss_fraction(logits: Tensor, targets: Tensor, precision: torch.dtype | None = None) -> Tensor:
    """Share of rows whose cross-entropy is exactly 0 in ``precision`` (the reference's ``zero_terms``).

    The loss of row i is log S − (z_y − max z); it is 0 exactly when the target is the maximum and S == 1,
    which is how it is computed here (no second pass over the classes).

    Example:
        >>> zero_loss_fraction(torch.tensor([[0.0, -200.0], [0.0, -200.0]]), torch.tensor([0, 1]))
        tensor(0.5000)
    """
    z = logits.detach()
    if precision is not None:
        z = z.to(precision)
    top = z.amax(dim=-1, keepdim=True)
    s = torch.exp(z - top).sum(dim=-1)
    at_target = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return ((s == 1) & (at_target == top.squeeze(-1))).float().mean()
