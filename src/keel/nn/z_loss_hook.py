"""ZLossHook: a forward hook on the output head that records log Z, so a loop can add the z-loss.

z-loss from PaLM (Chowdhery et al. 2022) and Wortsman et al. (2023, arXiv 2309.14322).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from keel.losses.z_loss import DEFAULT_COEFFICIENT, check_coefficient, maskable_log_partition, z_loss_from_log_z


class ZLossHook:
    """Records log Z = logsumexp(logits) of every forward of the module it is attached to.

    The z-loss is a term of the *loss*, so it cannot be applied to a model by surgery alone: this hook
    keeps the log Z of the latest forward (with its graph) and `loss` turns it into
    ``coefficient · mean(log Z²)`` for the training loop to add. That keeps the loss the loop reports
    honest and the scaling right under gradient accumulation and ``GradScaler``, which a hook that
    injected the gradient behind the loop's back would get wrong.

    ``last_log_z`` (detached) serves monitoring: its mean drifting far from 0 is the output-logit
    divergence the z-loss prevents. log Z and the penalty are `keel.losses.log_partition` and
    `keel.losses.z_loss_from_log_z` (float32 or wider; a mask must have the tokens' shape); a token the mask
    leaves out gets gradient exactly 0, even a NaN or all −inf row (a fully masked row under left padding).

    Args:
        coefficient: Weight of the penalty (1e-4, PaLM and Wortsman et al.).

    Example:
        >>> import torch
        >>> head = nn.Linear(4, 10)
        >>> hook = ZLossHook()
        >>> handle = hook.attach(head)
        >>> logits = head(torch.randn(2, 3, 4))
        >>> loss = logits.square().mean() + hook.loss()   # task loss + z-loss
        >>> hook.last_log_z.shape
        torch.Size([2, 3])

    References:
        Chowdhery et al. (2022), arXiv 2204.02311, §5; Wortsman et al. (2023), arXiv 2309.14322.
    """

    def __init__(self, coefficient: float = DEFAULT_COEFFICIENT) -> None:
        check_coefficient(coefficient, "ZLossHook.coefficient")
        self.coefficient = float(coefficient)
        self.log_z: Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if logits is None:
            raise TypeError(
                f"{type(module).__name__} returned {type(output).__name__}; "
                "allowed: a Tensor of logits or an "
                "object with a .logits attribute"
            )
        self.log_z = maskable_log_partition(logits)  # a token `loss(mask)` leaves out gets gradient 0

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Register on ``module`` (the output head) as a forward hook."""
        return module.register_forward_hook(self)

    @property
    def last_log_z(self) -> Tensor | None:
        """log Z of the latest forward, detached."""
        return None if self.log_z is None else self.log_z.detach()

    def loss(self, mask: Tensor | None = None) -> Tensor:
        """``coefficient · mean(log Z²)`` of the latest forward (over ``mask``'s True tokens if given).

        Raises:
            RuntimeError: no forward has run since the hook was attached.
            ValueError: ``mask`` does not have the tokens' shape (the logits' shape without the vocabulary).
        """
        if self.log_z is None:
            raise RuntimeError("ZLossHook.loss() called before any forward of the hooked module")
        return z_loss_from_log_z(self.log_z, coefficient=self.coefficient, mask=mask)
