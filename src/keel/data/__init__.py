"""Data audits for preference training: CHES scores of preference pairs and a filter that drops the riskiest."""

from keel.data.ches import ches_score, ches_scores

__all__ = ["ches_score", "ches_scores"]
