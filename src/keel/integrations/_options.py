"""The arguments both trainer callbacks take: which `Guard` arguments the trainer owns, and who clips."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TRAINER_OWNED = frozenset({"model", "optimizer", "scheduler", "scaler", "max_grad_norm"})


def takes_over_clipping(policy: str, take_over_clipping: bool | None, guard_kwargs: Mapping[str, Any]) -> bool:
    """Check ``guard_kwargs`` and resolve ``take_over_clipping``: by default keel clips (measuring the gradient
    before clipping) except under ``"observe"``, which leaves the trainer's clipping so training stays
    bit-identical.

    Raises:
        ValueError: ``guard_kwargs`` holds an argument the trainer provides itself.
    """
    own = TRAINER_OWNED & set(guard_kwargs)
    if own:
        raise ValueError(f"KeelCallback({', '.join(sorted(own))}=...): set by the Trainer; allowed: other Guard "
                         "arguments (probes, detectors, recovery, log_every, max_consecutive_skips, config, seed)")
    return policy != "observe" if take_over_clipping is None else take_over_clipping
