"""σReparam: W ↦ (γ/σ(W))·W, σ by one power iteration per training forward, γ a learned scalar.

From Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
(ICML 2023, arXiv 2303.06296).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def as_matrix(weight: Tensor) -> Tensor:
    """The weight as the matrix whose spectral norm is meant: conv kernels flatten to (out, in·kh·kw)."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def power_iteration_sigma(matrix: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration step from the right singular vector estimate ``u``; returns (σ, u').

    v = normalize(W·u), u' = normalize(Wᵀ·v), σ = vᵀ·W·u'. u and v carry no gradient, so the gradient
    of σ with respect to W is v·u'ᵀ — the gradient of the top singular value when the estimate is exact.
    """
    with torch.no_grad():
        v = F.normalize(matrix.detach() @ u, dim=0)
        u_next = F.normalize(matrix.detach().t() @ v, dim=0)
    return torch.dot(v, matrix @ u_next), u_next


class SigmaReparam(nn.Module):
    """The σReparam map as a module: ``forward(W) = (γ / σ(W)) · W``.

    Usable on its own, inside `SigmaReparamLinear`, or as a ``torch.nn.utils.parametrize``
    parametrization, which is how `keel.stabilize` applies it to any weight (``nn.Linear``, Hugging Face
    ``Conv1D``, ``nn.MultiheadAttention.in_proj_weight``) without changing the module.

    σ is re-estimated by one power-iteration step on every forward; the persistent vector ``u`` advances
    only in training mode (eval reuses it, so eval outputs are deterministic), and so does the ``sigma``
    buffer, which holds the latest training estimate for monitoring. σ and the power iteration
    run in float32 with autocast off, as the official FP32 wrapper does. ``u`` starts at the exact top
    right singular vector (one SVD at construction) and γ at σ(W), so the map is the identity at
    conversion.

    With ``stats_only`` the weight passes unchanged and only σ is tracked (no γ parameter): a spectral
    norm monitor.

    Args:
        weight: The weight the map will be applied to (used for shapes, the SVD and γ's initial value).
        stats_only: Track σ without reparametrising.

    References:
        Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu, Susskind (2023), "Stabilizing
        Transformer Training by Preventing Attention Entropy Collapse", arXiv 2303.06296. Official code:
        apple/ml-sigma-reparam ``vision/layers.py`` (``SpectralNormedWeight``, ``SNLinear``).
    """

    # Buffers, declared for the type checker (nn.Module's attribute lookup is typed Tensor | Module).
    u: Tensor
    sigma: Tensor

    def __init__(self, weight: Tensor, *, stats_only: bool = False) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; allowed: 2 or more dimensions")
        matrix = as_matrix(weight.detach()).float()
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.stats_only = stats_only
        self.register_buffer("u", vh[0].clone())
        self.register_buffer("sigma", s[0].clone())
        # γ follows the weight's dtype like every other parameter of the model; σ stays float32.
        self.gamma = None if stats_only else nn.Parameter(s[0].to(weight.dtype).clone())

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            # .float(): the buffers may have followed a model.half(); the estimate stays float32.
            sigma, u_next = power_iteration_sigma(as_matrix(weight).float(), self.u.float())
        if self.training:
            with torch.no_grad():
                self.u.copy_(u_next)
                self.sigma.copy_(sigma)
        if self.gamma is None:
            return weight
        # clamp_min keeps an all-zero weight at zero instead of 0/0.
        scale = self.gamma.float() / sigma.clamp_min(torch.finfo(torch.float32).tiny)
        return weight * scale.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.u.numel()}, stats_only={self.stats_only}"


class SigmaReparamLinear(nn.Linear):
    """``nn.Linear`` with σReparam: ``y = x·((γ/σ(W))·W)ᵀ + b``.

    Use it in place of ``nn.Linear`` to bound each layer's spectral norm by the learned γ; Zhai et al.
    train ViTs without warm-up, weight decay or LayerNorm this way and show it prevents attention-entropy
    collapse. `from_linear` converts an existing layer (sharing its weight and bias, so optimizers and
    checkpoints keep working) with the output unchanged at conversion; ``stats_only`` only tracks σ.

    Example:
        >>> layer = nn.Linear(8, 4)
        >>> sn = SigmaReparamLinear.from_linear(layer)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(sn(x), layer(x), atol=1e-5)
        True

    References:
        Zhai et al. (2023), arXiv 2303.06296. Official code: apple/ml-sigma-reparam ``vision/layers.py``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        stats_only: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.reparam = SigmaReparam(self.weight, stats_only=stats_only)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, stats_only: bool = False) -> SigmaReparamLinear:
        """A σReparam layer sharing ``linear``'s weight and bias Parameters (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.reparam = SigmaReparam(linear.weight, stats_only=stats_only)
        layer.train(linear.training)
        return layer

    @property
    def spectral_norm(self) -> Tensor:
        """The latest σ(W) estimate (a 0-d buffer)."""
        return self.reparam.sigma

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.reparam(self.weight), self.bias)
