"""σReparam: W ↦ (γ/σ(W))·W, σ by one power iteration per training forward, γ a learned scalar.

From Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
(ICML 2023, arXiv 2303.06296).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel.losses._checks import is_int


def as_matrix(weight: Tensor) -> Tensor:
    """The weight as the matrix whose spectral norm is meant: conv kernels flatten to (out, in·kh·kw)."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


def power_iteration_sigma(matrix: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration step from the right singular vector estimate ``u``; returns (σ, u').

    v = normalize(W·u), u' = normalize(Wᵀ·v), σ = vᵀ·W·u'. u and v carry no gradient, so the gradient
    of σ with respect to W is v·u'ᵀ — the gradient of the top singular value when the estimate is exact.

    When Wᵀ·v is zero (an all-zero W) u is kept and σ = 0: ``F.normalize`` made u' = 0, a fixed point from
    which σ stayed 0 even after W moved. The vectors are divided by their exact norms (``F.normalize``'s
    1e-12 floor left them short of unit length for a W with σ ≲ 1e-12, and σ far too small).
    """
    with torch.no_grad():
        v = _unit(matrix.detach() @ u, 0.0)
        u_next = _unit(matrix.detach().t() @ v, u)
    return torch.dot(v, matrix @ u_next), u_next


def _unit(vector: Tensor, fallback: Tensor | float) -> Tensor:
    """``vector / ‖vector‖``, or ``fallback`` where the norm is 0 (no host sync)."""
    norm = torch.linalg.vector_norm(vector)
    return torch.where(norm > 0, vector / torch.where(norm > 0, norm, 1.0), fallback)


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

    An all-zero weight (a zero-initialised output projection: modded-nanogpt's ``c_proj``, DiT's adaLN) has
    no direction for W/σ(W), and γ = σ(W) = 0 gave both γ and W zero gradients: the layer never trained. For
    it γ starts at 0 and `right_inverse` gives the weight a random direction D (nn.Linear's default init
    scale): the map γ·D/σ(D) is still 0 at conversion, γ gets the gradient ⟨∂L/∂Ŵ, D⟩/σ(D), and D trains as
    soon as γ ≠ 0 — the zero init's "start at 0, grow smoothly" is kept. ``torch.nn.utils.parametrize``
    (so `keel.stabilize`) and `SigmaReparamLinear.from_linear` apply it; used on its own, pass the weight
    through ``right_inverse`` first.

    With ``stats_only`` the weight passes unchanged and only σ is tracked (no γ parameter): a spectral
    norm monitor.

    Args:
        weight: The weight the map will be applied to (used for shapes, the SVD and γ's initial value).
        stats_only: Track σ without reparametrising.
        generator: Draws the direction given to an all-zero weight (default: torch's global generator, as
            module initialisation uses).

    References:
        Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu, Susskind (2023), "Stabilizing
        Transformer Training by Preventing Attention Entropy Collapse", arXiv 2303.06296. Official code:
        apple/ml-sigma-reparam ``vision/layers.py`` (``SpectralNormedWeight``, ``SNLinear``).
    """

    # Buffers, declared for the type checker (nn.Module's attribute lookup is typed Tensor | Module).
    u: Tensor
    sigma: Tensor

    def __init__(self, weight: Tensor, *, stats_only: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; allowed: 2 or more dimensions")
        if weight.numel() == 0:  # its SVD has no singular value: there is no σ to divide by
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, a dimension of size 0; allowed: a weight with no "
                "dimension of size 0 (an empty matrix has no spectral norm)"
            )
        self.stats_only = stats_only
        # The direction an all-zero weight is given by right_inverse (None once used, or when not needed).
        self._direction: Tensor | None = None
        if not stats_only and weight.device.type != "meta" and not weight.detach().any():  # meta: no values yet
            self._direction = _random_direction(weight, generator)
        matrix = as_matrix(weight.detach() if self._direction is None else self._direction).float()
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("u", vh[0].clone())
        self.register_buffer("sigma", s[0].clone())
        # γ follows the weight's dtype like every other parameter of the model; σ stays float32. For a zero
        # weight γ = 0 keeps the map's output at 0.
        initial = s[0] if self._direction is None else torch.zeros_like(s[0])
        self.gamma = None if stats_only else nn.Parameter(initial.to(weight.dtype).clone())

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

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The tensor to store so that the map gives ``weight`` (``torch.nn.utils.parametrize`` calls it when
        registering): ``weight`` itself, except the all-zero weight this map was built for, which becomes its
        random direction D (γ = 0, so the map still gives 0)."""
        direction, self._direction = self._direction, None
        if direction is None or weight.any():
            return weight
        return direction.to(device=weight.device, dtype=weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.u.numel()}, stats_only={self.stats_only}"


def _random_direction(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random weight of ``weight``'s shape at nn.Linear's default scale, U(−1/√fan_in, 1/√fan_in)."""
    fan_in = as_matrix(weight).shape[1]
    uniform = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
    return ((2.0 * uniform - 1.0) / fan_in**0.5).to(device=weight.device, dtype=weight.dtype)


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
        if not (is_int(in_features) and is_int(out_features) and in_features >= 1 and out_features >= 1):
            raise ValueError(
                f"SigmaReparamLinear(in_features={in_features!r}, out_features={out_features!r}); allowed: two "
                "ints >= 1 (an empty weight has no spectral norm: keep nn.Linear there)"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.reparam = SigmaReparam(self.weight, stats_only=stats_only)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, stats_only: bool = False) -> SigmaReparamLinear:
        """A σReparam layer sharing ``linear``'s weight and bias Parameters (no copy); an all-zero weight is
        given a random direction in place (`SigmaReparam`), the layer's output unchanged."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.reparam = SigmaReparam(linear.weight, stats_only=stats_only)
        stored = layer.reparam.right_inverse(layer.weight)
        if stored is not layer.weight:  # an all-zero weight gets its direction (the output stays 0: γ = 0)
            with torch.no_grad():
                layer.weight.copy_(stored)
        layer.train(linear.training)
        return layer

    @property
    def spectral_norm(self) -> Tensor:
        """The latest σ(W) estimate (a 0-d buffer)."""
        return self.reparam.sigma

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.reparam(self.weight), self.bias)
