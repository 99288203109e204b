"""Data: audits of preference pairs (CHES scores, a filter that drops the riskiest), the skip list of examples a
run must not train on again with the sampler that honours it, power-law replay of earlier tasks, and the
test-time-adaptation confidence-drop filter."""

from keel.data.ches import ches_score, ches_scores
from keel.data.confidence_filter import ConfidenceDropFilter, confidence_drop_mask
from keel.data.power_law_replay import PowerLawReplay
from keel.data.preference_filter import (
    DEFAULT_DROP_FRACTION,
    DroppedPair,
    PreferenceFilterResult,
    filter_preference_pairs,
)
from keel.data.skip_list import SKIP_LIST_NAME, SkipEntry, SkipList
from keel.data.skip_list_sampler import SkipListSampler

__all__ = [
    "ConfidenceDropFilter",
    "DEFAULT_DROP_FRACTION",
    "DroppedPair",
    "PowerLawReplay",
    "PreferenceFilterResult",
    "SKIP_LIST_NAME",
    "SkipEntry",
    "SkipList",
    "SkipListSampler",
    "ches_score",
    "ches_scores",
    "confidence_drop_mask",
    "filter_preference_pairs",
]
