"""Data audits for preference training: CHES scores of preference pairs and a filter that drops the riskiest."""

from keel.data.ches import ches_score, ches_scores
from keel.data.preference_filter import (
    DEFAULT_DROP_FRACTION,
    DroppedPair,
    PreferenceFilterResult,
    filter_preference_pairs,
)

__all__ = [
    "DEFAULT_DROP_FRACTION",
    "DroppedPair",
    "PreferenceFilterResult",
    "ches_score",
    "ches_scores",
    "filter_preference_pairs",
]
