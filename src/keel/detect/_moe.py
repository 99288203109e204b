"""What the mixture-of-experts detectors share: naming the router (MoE layer) that a finding is about.

The router probe (`keel.signals.router`) stores each signal per router, ``moe/<signal>/<router>``, on its
``log_every`` steps; the run-level value is the worst router's. A finding names that router when the step has the
family, so the user knows which layer to look at.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from keel._core.observation import Observation


def worst_router(obs: Observation, family: str, *, worst: Callable[..., tuple[float, str]] = max) -> str | None:
    """The router of ``family`` with the worst finite value this step (``worst=max`` or ``min``), or None without one.

    Example:
        >>> obs = Observation(step=0, per_param={"moe/router_z/": (("layers.0.mlp.gate", "layers.1.mlp.gate"),
        ...                                                        [3.0, 9.5])})
        >>> worst_router(obs, "moe/router_z/"), worst_router(obs, "moe/router_z/", worst=min)
        ('layers.1.mlp.gate', 'layers.0.mlp.gate')
    """
    names, values = obs.per_param.get(family, ((), []))
    finite = [(v, n) for n, v in zip(names, values, strict=False) if math.isfinite(v)]
    return worst(finite)[1] if finite else None
