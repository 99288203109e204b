"""The loop object: `Guard` orders signals → detect → recover each step and records the run."""

from keel.guard.distributed import DistributedConfig, RankSync
from keel.guard.guard import Guard
from keel.guard.optimizers import Optimizers, Schedulers
from keel.guard.rank_outlier import RankOutlierConfig, RankOutlierDetector

__all__ = [
    "DistributedConfig",
    "Guard",
    "Optimizers",
    "RankOutlierConfig",
    "RankOutlierDetector",
    "RankSync",
    "Schedulers",
]
