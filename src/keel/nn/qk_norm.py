"""QKNorm: LayerNorm or RMSNorm over the head dimension of queries or keys, before their dot product.

From Dehghani et al. (2023), "Scaling Vision Transformers to 22 Billion Parameters" (arXiv 2302.05442), and
Wortsman et al. (2023), "Small-scale proxies for large-scale Transformer training instabilities"
(arXiv 2309.14322).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel.losses._checks import is_int, is_number

QK_NORM_KINDS = ("layer", "rms")


class QKNorm(nn.Module):
    """Normalise the last axis (one head's features) of queries or keys.

    Without it the attention logits q·k/sqrt(d) can grow without bound at high learning rates, the
    softmax turns one-hot (attention-entropy collapse) and the loss diverges; normalised q and k bound
    each logit by sqrt(d)·|γ_q|·|γ_k|. One instance holds one gain (and bias, for LayerNorm) of size
    ``head_dim`` shared by all heads, as in ViT-22B, OLMo-2 and Qwen3; use one for q and one for k.

    Half-precision inputs are normalised in float32 and returned in their own dtype.

    Args:
        head_dim: Size of the last axis.
        kind: ``"layer"`` (LayerNorm, Dehghani et al., Wortsman et al.) or ``"rms"`` (RMSNorm, as in
            OLMo-2 and Qwen3).
        eps: Added to the variance.
        affine: Learn a gain (and a bias for LayerNorm), initialised to 1 (and 0).
        bias: Learn the LayerNorm bias too; False for models built without biases (nanoGPT's ``bias=False``).

    Example:
        >>> q = torch.randn(2, 4, 8, 16)  # (batch, heads, tokens, head_dim)
        >>> QKNorm(16)(q).pow(2).mean(-1).allclose(torch.ones(2, 4, 8), atol=1e-4)
        True

    References:
        Dehghani et al. (2023), arXiv 2302.05442, §3.1; Wortsman et al. (2023), arXiv 2309.14322, §3.1.
        No official code for either; OLMo-core ``nn/attention/__init__.py`` implements the same per-head norm.
    """

    def __init__(
        self,
        head_dim: int,
        *,
        kind: str = "layer",
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not is_int(head_dim) or head_dim < 1:
            raise ValueError(f"QKNorm.head_dim={head_dim!r}; allowed: a positive int")
        if kind not in QK_NORM_KINDS:
            raise ValueError(f"QKNorm.kind={kind!r}; allowed: {', '.join(QK_NORM_KINDS)}")
        if not (is_number(eps) and eps > 0):
            raise ValueError(f"QKNorm.eps={eps!r}; allowed: a finite number > 0")
        self.head_dim, self.kind, self.eps = head_dim, kind, float(eps)
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype)) if affine else None
        has_bias = affine and bias and kind == "layer"
        self.bias = nn.Parameter(torch.zeros(head_dim, device=device, dtype=dtype)) if has_bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"input's last axis is {x.shape[-1]}; allowed: head_dim={self.head_dim}")
        y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        weight = None if self.weight is None else self.weight.to(y.dtype)
        if self.kind == "layer":
            bias = None if self.bias is None else self.bias.to(y.dtype)
            y = F.layer_norm(y, (self.head_dim,), weight, bias, self.eps)
        else:
            y = F.rms_norm(y, (self.head_dim,), weight, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.head_dim}, kind={self.kind!r}, eps={self.eps}, affine={self.weight is not None}, "
            f"bias={self.bias is not None}"
        )
