"""Act: the escalation ladder, snapshots (memory ring and disk), rollback and actions.

The only code that changes training state.
"""

from keel.recover.actions import ActionState, apply_actions, choose_actions
from keel.recover.actuator import Actuator
from keel.recover.disk import DiskSnapshots, SnapshotCorrupt
from keel.recover.escalation import POLICIES, SKIPPABLE_KINDS, Escalation, EscalationConfig, Policy, skippable
from keel.recover.recovery import Recovery, RecoveryConfig, RollbackResult
from keel.recover.snapshot import Snapshot, SnapshotRing
from keel.recover.state import TrainingState, capture_plain, restore, tensor_sources

__all__ = [
    "ActionState",
    "Actuator",
    "DiskSnapshots",
    "Escalation",
    "EscalationConfig",
    "POLICIES",
    "Policy",
    "Recovery",
    "RecoveryConfig",
    "RollbackResult",
    "SKIPPABLE_KINDS",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotRing",
    "TrainingState",
    "apply_actions",
    "capture_plain",
    "choose_actions",
    "restore",
    "skippable",
    "tensor_sources",
]
