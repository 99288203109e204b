"""Attention-logit-growth detector: flags the max attention logit growing exponentially, before the loss pays.

Reads ``attn/max_logit`` (the `attn_logits` probe). Levels follow practice: QK-clip caps logits at
τ = 100 (Kimi K2's MuonClip, Megatron-LM's ``qk_clip_threshold``), so sustained growth above 100 is an
alarm; below that, only fast growth (×1.4 per step or more) counts, because every model's logits grow
quickly from their near-zero initialisation (keel's small proxy at a healthy learning rate grows them
×1.27 per step up to ~50). 1000 is critical: attention is one-hot long before. In keel's small proxy at
lr 0.1 (`train_proxy(TrainConfig(lr=0.1))`) the logits grow 0.2 → 8 → 25 in 6 steps and reach 1e5.

References:
    Dehghani et al. 2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322 (no official code);
    Kimi Team 2025, arXiv 2507.20534 and Megatron-LM ``megatron/core/optimizer/qk_clip.py`` (τ = 100).
"""

from __future__ import annotations

from dataclasses import replace

from keel._core import keys
from keel._core.validate import config_from
from keel.detect.detector import DETECTORS
from keel.detect.growth import GrowthConfig, GrowthDetector

SIGNAL = keys.ATTN_MAX_LOGIT


def attention_logit_growth_config(**overrides: object) -> GrowthConfig:
    """The default settings, with any `GrowthConfig` field overridden."""
    base = GrowthConfig(
        signal=SIGNAL,
        kind="attention_logit_growth",
        min_level=5.0,
        fast_rate=0.35,
        high_level=100.0,
        slow_rate=0.005,
        critical_level=1000.0,
        patience=2,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@DETECTORS.register("attention_logit_growth")
class AttentionLogitGrowthDetector(GrowthDetector):
    """`GrowthDetector` on ``attn/max_logit`` with attention-specific levels.

    Example:
        >>> from keel._core import Observation
        >>> det = AttentionLogitGrowthDetector()
        >>> logits = [0.2, 1.2, 3.0, 8.2, 25.0, 56.0, 113.0]   # keel's proxy at lr 0.1, every other step
        >>> [(f.step, f.severity) for s, v in enumerate(logits)
        ...  for f in det.update(Observation(step=2 * s, values={"attn/max_logit": v}))]
        [(8, 'warning')]
    """

    def __init__(self, config: GrowthConfig | None = None, **overrides: object) -> None:
        super().__init__(config_from(self, GrowthConfig, config, overrides, build=attention_logit_growth_config))
