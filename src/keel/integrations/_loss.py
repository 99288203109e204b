"""StepLoss: the loss of one optimizer step, gathered from its micro-batches on device (no host sync).

Trainers never hand a callback the raw loss of a step: the Hugging Face ``Trainer`` even replaces a NaN or
Inf loss in what it logs by the running average (``logging_nan_inf_filter``, on by default, transformers
PR #13619), which hid a NaN model from users (optimum-graphcore PR #68). The adapters therefore take the
loss where the model or the trainer produces it, before any filter, and keel sees NaN as NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StepLoss:
    """Micro-batch losses of the current step, combined as a mean or, for shares of one total, a sum.

    Example:
        >>> meter = StepLoss()
        >>> meter.add(torch.tensor(2.0)); meter.add(torch.tensor(4.0))
        >>> meter.take()
        tensor(3.)
        >>> meter.take() is None
        True
    """

    def __init__(self) -> None:
        self._losses: list[Tensor] = []
        self._counts: list[Tensor | None] = []
        self._shares = False

    def add(self, loss: Tensor, *, share: bool = False, count: Tensor | None = None) -> None:
        """Add one micro-batch's loss; ``share=True`` when it is that micro-batch's share of the step's total
        (already divided by the step's token count, as HF models do given ``num_items_in_batch``). ``count``: the
        integer the loop multiplied its loss by (torchtune's ``loss * current_num_tokens``): when every share has
        one, the step's loss is the count-weighted mean, ``sum(loss * count) / sum(count)``, as torchtune logs it."""
        if loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()).float())
            self._counts.append(None if count is None else count.detach().reshape(()).float())
            self._shares = self._shares or share

    def take(self) -> Tensor | None:
        """The step's loss (a 0-d tensor on the loss's device), or None when none was seen; then forget it."""
        if not self._losses:
            return None
        stacked = torch.stack(self._losses)
        loss = stacked.sum() if self._shares else stacked.mean()
        counts = [c for c in self._counts if c is not None]
        if self._shares and len(counts) == len(self._losses):
            total = torch.stack(counts).sum().to(loss.device)
            loss = torch.where(total > 0, loss / total.clamp(min=1), loss)  # all counts 0: the sum, not 0/0
        self._losses, self._counts, self._shares = [], [], False
        return loss

    def __len__(self) -> int:
        return len(self._losses)
