"""Naming the member of a per-layer family that a finding is about: the router, block, tensor or layer to look at.

Probes store a signal per member as a family, ``<signal>/<member>`` (per router, per block, per tensor, per quantized
layer), on their ``log_every`` steps, and the run-level value is the worst member's. A finding names that member when
the step has the family, so the user knows where to look.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from keel._core.observation import Observation


def worst_member(obs: Observation, family: str, *, worst: Callable[..., tuple[float, str]] = max) -> str | None:
    """The member of ``family`` with the worst finite value this step (``worst=max`` or ``min``), or None without one.

    Example:
        >>> obs = Observation(step=0, per_param={"moe/router_z/": (("layers.0.mlp.gate", "layers.1.mlp.gate"),
        ...                                                        [3.0, 9.5])})
        >>> worst_member(obs, "moe/router_z/"), worst_member(obs, "moe/router_z/", worst=min)
        ('layers.1.mlp.gate', 'layers.0.mlp.gate')
    """
    names, values = obs.per_param.get(family, ((), []))
    finite = [(v, n) for n, v in zip(names, values, strict=False) if math.isfinite(v)]
    return worst(finite)[1] if finite else None
