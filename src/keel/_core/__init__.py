"""keel's vocabulary: findings, decisions, observations, signal keys, the registry and errors.

Imports nothing of keel and nothing heavy, so log readers and the report can use it without torch.
"""

from keel._core import keys
from keel._core.decision import ACTIONS, Action, Decision
from keel._core.errors import GuardClosed, KeelError, KeelWarning, TrainingAborted
from keel._core.finding import SEVERITIES, Finding, Severity, severity_rank
from keel._core.observation import Observation
from keel._core.registry import Registry

__all__ = [
    "ACTIONS",
    "Action",
    "Decision",
    "Finding",
    "GuardClosed",
    "KeelError",
    "KeelWarning",
    "Observation",
    "Registry",
    "SEVERITIES",
    "Severity",
    "TrainingAborted",
    "keys",
    "severity_rank",
]
