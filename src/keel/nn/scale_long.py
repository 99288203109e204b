"""ScaleLong: scaling the long skip connections of U-Nets (constant κ^i, or a learned calibration).

From Huang et al. (2023), "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network
Long Skip Connection" (NeurIPS 2023, arXiv 2310.13545).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keel.losses._checks import is_int, is_number

CALIBRATION_LAYOUTS = ("tokens", "channels")
MAX_SKIPS = 4096  # long skips of one U-Net (a U-ViT has depth/2): more is a mistake, and 10**30 built a list forever


def scale_long_factors(num_skips: int, kappa: float) -> list[float]:
    """CS factors for the decoder blocks in call order: block i (0-based) scales its skip by κ^(N−1−i).

    The first decoder block receives the deepest encoder output (skips are popped LIFO) and the smallest
    factor; the last one, fed by the shallowest encoder block, is unscaled.

    Example:
        >>> scale_long_factors(3, 0.5)
        [0.25, 0.5, 1.0]
    """
    if not is_int(num_skips) or not 1 <= num_skips <= MAX_SKIPS:
        raise ValueError(f"num_skips={num_skips!r}; allowed: an int from 1 to {MAX_SKIPS}")
    if not (is_number(kappa) and 0 < kappa <= 1):
        raise ValueError(f"kappa={kappa!r}; allowed: a number in (0, 1]")
    return [float(kappa) ** (num_skips - 1 - i) for i in range(num_skips)]


class LongSkipScaling(nn.Module):
    """Constant scaling (CS) of long skips: ``forward(skip, index)`` returns ``skip · κ^(N−1−index)``.

    Use it in a U-Net's decoder when training is unstable: the paper shows the long skips' coefficients
    control how much the input's perturbations are amplified through the decoder, and κ^i damps the
    deep ones. κ in [0.5, 0.95] (README); 2^(−1/2) for every skip is the Imagen/SR3 variant.

    Example:
        >>> cs = LongSkipScaling(2, kappa=0.5)
        >>> cs(torch.ones(1, 3), 0)
        tensor([[0.5000, 0.5000, 0.5000]])

    References:
        Huang, Zhang, Hu, Zhou, Yan (2023), arXiv 2310.13545. Official code: sail-sg/ScaleLong
        ``libs/uvit.py`` (``UViT.forward``, ``scalelong == 2``).
    """

    factors: Tensor  # a buffer, declared for the type checker (nn.Module's lookup is typed Tensor | Module)

    def __init__(self, num_skips: int, *, kappa: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("factors", torch.tensor(scale_long_factors(num_skips, kappa)), persistent=False)
        self.kappa = float(kappa)  # checked by scale_long_factors (float("x") raised first)

    def forward(self, skip: Tensor, index: int) -> Tensor:
        if not 0 <= index < self.factors.numel():
            raise IndexError(f"index={index}; allowed: 0..{self.factors.numel() - 1}")
        return skip * self.factors[index].to(skip.dtype)

    def extra_repr(self) -> str:
        return f"num_skips={self.factors.numel()}, kappa={self.kappa}"


class LongSkipCalibration(nn.Module):
    """Learned scaling (LS) of a long skip: ``skip ⊙ sigmoid(W2·relu(W1·pool(skip)))``, SE-style.

    ``layout="tokens"`` (U-ViT, as in the official code): skip is (B, L, D); features are averaged, and the
    calibration maps the L per-token means to L per-token factors (so L must be fixed). ``"channels"``
    (conv U-Nets): skip is (B, C, *spatial); space is averaged and C per-channel factors come out.
    One instance may be shared by all skips (the paper's LS) or built per skip.

    Args:
        size: L (tokens) or C (channels).
        reduction: Bottleneck ratio r of the two-layer MLP (16 in the paper).
        layout: ``"tokens"`` or ``"channels"``.
        bias: The MLP's layers learn biases (the paper's do); False for a model built without biases.

    References:
        Huang et al. (2023), arXiv 2310.13545. Official code: sail-sg/ScaleLong ``libs/uvit.py``
        (``Attentionlayer``, ``scalelong == 3``).
    """

    def __init__(self, size: int, *, reduction: int = 16, layout: str = "tokens", bias: bool = True) -> None:
        super().__init__()
        if not is_int(size) or size < 1:
            raise ValueError(f"LongSkipCalibration.size={size!r}; allowed: a positive int")
        if not is_int(reduction) or reduction < 1:
            raise ValueError(f"LongSkipCalibration.reduction={reduction!r}; allowed: a positive int")
        if layout not in CALIBRATION_LAYOUTS:
            raise ValueError(f"LongSkipCalibration.layout={layout!r}; allowed: {', '.join(CALIBRATION_LAYOUTS)}")
        self.layout = layout
        hidden = max(1, size // reduction)
        self.fc1, self.fc2 = nn.Linear(size, hidden, bias=bias), nn.Linear(hidden, size, bias=bias)

    def gate(self, skip: Tensor) -> Tensor:
        """The factors ζ(skip) in (0, 1), shaped to broadcast against ``skip``."""
        if self.layout == "tokens":
            pooled = skip.mean(dim=-1)  # (B, L)
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled)))).unsqueeze(-1)  # (B, L, 1)
        pooled = skip.flatten(2).mean(dim=-1)  # (B, C)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        return gate.reshape(*gate.shape, *([1] * (skip.dim() - 2)))  # (B, C, 1, ...)

    def forward(self, skip: Tensor) -> Tensor:
        return skip * self.gate(skip)
