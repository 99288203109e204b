"""StableMax as a module: a softmax replacement whose terms grow linearly, so they cannot underflow.

From Prieto et al. (2025), "Grokking at the edge of numerical stability" (arXiv 2501.04697).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keel.losses._checks import is_int


class StableMax(nn.Module):
    """``s(x_i) / Σ_j s(x_j)`` along ``dim``, with s(x) = x + 1 (x ≥ 0) and 1/(1 − x) (x < 0).

    Use it where a softmax over the output logits collapses in float32 (every non-maximal term
    underflows, so the output is exactly one-hot and gradients vanish). For the training loss prefer
    `keel.losses.stablemax_cross_entropy`, which is computed without the cancellation of log(p).
    The paper replaces the output softmax only, not the attention softmax.

    Half-precision inputs are computed in float32 and returned in float32.

    Args:
        dim: Axis to normalise over.
        log: Return log-probabilities.

    Example:
        >>> StableMax()(torch.tensor([100.0, 0.0, -100.0]))
        tensor([9.9010e-01, 9.8030e-03, 9.7059e-05])

    References:
        Prieto, Barsbey, Mediano, Birdal (2025), arXiv 2501.04697. Official code:
        LucasPrietoAl/grokking-at-the-edge-of-numerical-stability ``utils.py`` (``s``, ``log_stablemax``).
    """

    def __init__(self, dim: int = -1, *, log: bool = False) -> None:
        super().__init__()
        if not is_int(dim):
            raise ValueError(f"StableMax.dim={dim!r}; allowed: an int (the axis to normalise over)")
        if not isinstance(log, bool):
            raise ValueError(f"StableMax.log={log!r}; allowed: True or False")
        self.dim, self.log = dim, log

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        # Both branches on clamped inputs: no inf (hence no NaN gradient) in the branch not taken.
        s = torch.where(x >= 0, 1.0 + x.clamp(min=0.0), 1.0 / (1.0 - x.clamp(max=0.0)))
        total = s.sum(dim=self.dim, keepdim=True)
        if not self.log:
            return s / total
        log_s = torch.log1p(x.clamp(min=0.0)) - torch.log1p(-x.clamp(max=0.0))
        out = log_s - torch.log(total)
        # The largest term's log-probability may be near 0, where log s − log S cancels: sum the rest
        # directly.
        top = s.argmax(dim=self.dim, keepdim=True)
        rest = s.scatter(self.dim, top, 0.0).sum(dim=self.dim, keepdim=True)
        return out.scatter(self.dim, top, -torch.log1p(rest / s.gather(self.dim, top)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, log={self.log}"
