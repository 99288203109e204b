"""Data: audits of preference pairs (CHES scores, a filter that drops the riskiest) and the skip list of examples a
run must not train on again, with the sampler that honours it."""

from keel.data.ches import ches_score, ches_scores
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
    "filter_preference_pairs",
]
