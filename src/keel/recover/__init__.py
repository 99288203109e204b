"""Act: the escalation ladder (and, with snapshots, rollback). The only code that changes training state."""

from keel.recover.escalation import POLICIES, SKIPPABLE_KINDS, Escalation, EscalationConfig, Policy

__all__ = ["POLICIES", "SKIPPABLE_KINDS", "Escalation", "EscalationConfig", "Policy"]
