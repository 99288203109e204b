"""The loop object: `Guard` orders signals → detect → recover each step and records the run."""

from keel.guard.guard import Guard

__all__ = ["Guard"]
