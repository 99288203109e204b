"""The arguments both trainer callbacks take: which `Guard` arguments the trainer owns, and who clips."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keel.guard.options import check_arguments

TRAINER_OWNED = frozenset({"model", "optimizer", "scheduler", "scaler", "max_grad_norm"})


def takes_over_clipping(
    policy: str, take_over_clipping: bool | None, guard_kwargs: Mapping[str, Any], run_dir: object = None
) -> bool:
    """Check the callback's arguments and resolve ``take_over_clipping``: by default keel clips (measuring the
    gradient before clipping) except under ``"observe"``, which leaves the trainer's clipping so training stays
    bit-identical.

    The `Guard` is built when training begins, deep inside ``fit``/``train``: its arguments are checked here,
    when the callback is built, so a typo fails at once.

    Raises:
        ValueError: ``guard_kwargs`` holds an argument the trainer provides itself, an argument `Guard` does not
            take, or a value `Guard` would refuse.
    """
    own = TRAINER_OWNED & set(guard_kwargs)
    if own:
        raise ValueError(
            f"KeelCallback({', '.join(sorted(own))}=...): set by the Trainer; allowed: other Guard "
            "arguments (probes, detectors, recovery, log_every, max_consecutive_skips, config, seed)"
        )
    try:
        check_arguments({**guard_kwargs, "policy": policy, "run_dir": run_dir})
    except ValueError as exc:
        raise ValueError(f"KeelCallback: {exc}") from None
    if take_over_clipping is not None and not isinstance(take_over_clipping, bool):
        raise ValueError(f"KeelCallback(take_over_clipping={take_over_clipping!r}); allowed: None, True or False")
    return policy != "observe" if take_over_clipping is None else take_over_clipping


def checked_extend_after_rollback(value: object) -> bool:
    """The callbacks' ``extend_after_rollback`` (`keel.integrations._run_length`), checked when the callback is built.

    Raises:
        ValueError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise ValueError(f"KeelCallback(extend_after_rollback={value!r}); allowed: True or False")
    return value
