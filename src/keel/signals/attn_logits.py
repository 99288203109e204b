"""Attention max-logit probe: the largest pre-softmax attention logit of each layer.

| key                      | cadence                               | cost                                         |
|--------------------------|---------------------------------------|----------------------------------------------|
| `attn/max_logit`         | every `every` / `fused_every` steps   | explicit: one max; fused: one extra `q @ kᵀ` |
| `attn/max_logit/<layer>` | as above; stored on `log_every` steps | one float per attention module               |

Explicit softmax attention is read every `every` steps, at the cost of one max over the logits the model
already has; fused attention (SDPA, `nn.MultiheadAttention`) every `fused_every` steps, at the cost of one
extra `q @ kᵀ` per layer.

Unbounded growth of the attention logits is the first large-scale Transformer instability named by
Dehghani et al. (2023, ViT-22B) and reproduced at small scale by Wortsman et al. (2023): the logits grow
by orders of magnitude, attention turns one-hot, and the loss stalls or diverges; QK-norm keeps them
bounded. The value is the signed maximum (as Megatron-LM logs ``max_attention_logit``), so masked
entries never count. Works on explicit ``q @ kᵀ`` + softmax attention (keel's proxy, nanoGPT without
flash, Hugging Face "eager"), ``F.scaled_dot_product_attention`` (nanoGPT, Hugging Face "sdpa", GPT-2 and
Llama) and ``nn.MultiheadAttention``; see `keel.signals._attention_tap` for how.

References:
    Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters", arXiv 2302.05442.
    Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities",
    arXiv 2309.14322 (no official code). Megatron-LM ``megatron/core/optimizer/qk_clip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals._attention_tap_probe import AttentionTapProbe
from keel.signals.probe import Measurements, PerParam
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class AttnLogitsConfig:
    """Settings of the attention max-logit probe.

    Attributes:
        every: Cadence (steps) for models whose attention calls an explicit softmax (cheap).
        fused_every: Cadence for fused attention (SDPA, ``nn.MultiheadAttention``), where the logits must
            be rebuilt with an extra ``q @ kᵀ``.
        modules: Names of the attention modules to watch; ``None`` finds modules whose class name ends in
            ``Attention``/``Attn``.
    """

    every: int = 1
    fused_every: int = 10
    modules: list[str] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("every", "fused_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttnLogitsConfig.{name}={value!r}; allowed: an int >= 1")


def due(step: int, every: int) -> bool:
    return step % every == 0


@PROBES.register("attn_logits")
class AttnLogitsProbe(AttentionTapProbe):
    """Emits the largest attention logit per layer, measured inside the forward pass.

    Example:
        >>> from keel.proxy import create_proxy_model
        >>> model = create_proxy_model("tiny")
        >>> probe = AttnLogitsProbe()
        >>> probe.attach(model)
        >>> _ = model(torch.zeros(1, 8, dtype=torch.long))
        >>> sorted(probe.read())
        ['attn/max_logit', 'attn/max_logit/']
        >>> probe.detach()
    """

    name = "attn_logits"

    def __init__(self, config: AttnLogitsConfig | None = None, **fields: object) -> None:
        super().__init__()
        self.config = config_from(self, AttnLogitsConfig, config, fields)

    def _arm(self, step: int) -> None:
        if self._tap is not None:
            request = self._tap.subscribe(self)
            request.max_logit = due(step, self.config.every) or due(step, self.config.fused_every)
            request.fused = due(step, self.config.fused_every)

    def read(self) -> Measurements:
        """This step's values (what `measure` returns), without re-arming."""
        sites = self._tapped_sites()
        if not sites:
            return {}
        values = torch.stack([s.max_logit for s in sites])  # type: ignore[misc]
        return {
            keys.ATTN_MAX_LOGIT: values.amax(),  # NaN-propagating, like every max here
            keys.ATTN_MAX_LOGIT_PER_LAYER: PerParam(tuple(s.name for s in sites), values),
        }
