"""Attention-entropy probe: the mean entropy of the attention rows, per layer and per head.

| key                              | cadence             | cost                                           |
|----------------------------------|---------------------|------------------------------------------------|
| `attn/entropy`                   | every `every` steps | explicit softmax: one `xlogy` pass (see below) |
| `attn/entropy/<layer>`           | every `every` steps | one float per attention module                 |
| `attn/head_entropy/<layer>/h<i>` | every `every` steps | one float per head                             |

With explicit softmax the `xlogy` pass reads the probabilities the model already has; fused attention costs
an extra `q @ kᵀ` and softmax per layer.

Entropy of row i is −Σⱼ pᵢⱼ log pᵢⱼ (nats), averaged over batch and queries, leaving fully masked rows
out; `attn/entropy` is the mean over layers. A sharp fall ("entropy collapse") accompanies unstable
Transformer training; σReparam prevents it (Zhai et al. 2023). The reference logs the per-layer mean of
−Σ p·log(p + 1e-6) under stop-gradient (``speech/speech_transformer.py`` in apple/ml-sigma-reparam);
keel uses the exact ``xlogy`` form, which is 0 for p = 0 and has no 1e-6 bias. It shares the attention tap
with `attn_logits`, so both together cost one interception.

References:
    Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", ICML,
    arXiv 2303.06296; code github.com/apple/ml-sigma-reparam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel._core import keys
from keel._core.validate import check_types, config_from
from keel.signals._attention_tap_probe import AttentionTapProbe
from keel.signals.attn_logits import due
from keel.signals.probe import Measurements, PerParam
from keel.signals.registry import PROBES


@dataclass(kw_only=True)
class AttnEntropyConfig:
    """Settings of the attention-entropy probe.

    Attributes:
        every: Cadence in steps (the same for explicit and fused attention).
        per_head: Also emit one value per head.
        modules: Names of the attention modules; ``None`` finds them by class name.
    """

    every: int = 10
    per_head: bool = True
    modules: list[str] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"AttnEntropyConfig.every={self.every!r}; allowed: an int >= 1")


@PROBES.register("attn_entropy")
class AttnEntropyProbe(AttentionTapProbe):
    """Emits attention entropy per layer and head on a schedule, reduced inside the forward pass.

    Example:
        >>> from keel.proxy import create_proxy_model
        >>> model = create_proxy_model("tiny")
        >>> probe = AttnEntropyProbe()
        >>> probe.attach(model)
        >>> _ = model(torch.zeros(1, 8, dtype=torch.long))
        >>> sorted(probe.read())
        ['attn/entropy', 'attn/entropy/', 'attn/head_entropy/']
        >>> probe.detach()
    """

    name = "attn_entropy"

    def __init__(self, config: AttnEntropyConfig | None = None, **fields: object) -> None:
        super().__init__()
        self.config = config_from(self, AttnEntropyConfig, config, fields)

    def _arm(self, step: int) -> None:
        if self._tap is not None:
            request = self._tap.subscribe(self)
            request.entropy = request.fused = due(step, self.config.every)

    def read(self) -> Measurements:
        """This step's values (what `measure` returns), without re-arming."""
        # (layer name, per-head entropy sums, per-head row counts) of the sites measured this step
        sites = [
            (s.name, s.entropy_sum, s.entropy_count)
            for s in self._tapped_sites()
            if s.entropy_sum is not None and s.entropy_count is not None
        ]
        if not sites:
            return {}
        per_layer = torch.stack([sums.sum() / counts.sum() for _, sums, counts in sites])
        out: Measurements = {
            keys.ATTN_ENTROPY: per_layer.mean(),
            keys.ATTN_ENTROPY_PER_LAYER: PerParam(tuple(name for name, _, _ in sites), per_layer),
        }
        if self.config.per_head:
            names = tuple(f"{name}/h{i}" for name, sums, _ in sites for i in range(sums.numel()))
            heads = torch.cat([sums / counts for _, sums, counts in sites])
            out[keys.ATTN_HEAD_ENTROPY_PER_HEAD] = PerParam(names, heads)
        return out
