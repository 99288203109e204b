"""How long a benchmark warms a ``torch.compile``d loop under keel before timing it, and how it checks that it did.

Every hook keel traces into the user's compiled forward (the attention tap on a ``logits_tap`` child, the activation
probes) reads Python state that dynamo guards on, and some of that state follows a probe's cadence: the attention
entropy is reduced on every 10th step only, so that step runs a graph of its own, compiled the first time it comes
(with inductor: seconds). A user's run pays that once; a benchmark that times it inside a block reports a compile,
not a step (session 9's CPU sanity run of the full probes: ratio 36x, steady 1.19). So a compiled variant first runs
one whole period of its cadences, and every timed block counts the graphs dynamo captured inside it: 0 is the claim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch._dynamo.utils import counters

MAX_WARMUP = 1000  # a period of co-prime cadences can be long; past this the timed blocks' count still tells


def cadences(guard: Any) -> set[int]:
    """Every step cadence of a `Guard`'s probes (their configs' ``every`` and ``*_every`` fields) and its
    ``log_every``; {1} for no guard."""
    found = {1}
    if guard is None:
        return found
    guard = getattr(guard, "guard", guard)  # keel.watch's handle holds its Guard
    found.add(int(getattr(guard, "log_every", 1)))
    for probe in getattr(guard, "probes", ()):
        config = getattr(probe, "config", None)
        if not dataclasses.is_dataclass(config):
            continue
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if (field.name == "every" or field.name.endswith("_every")) and isinstance(value, int) and value > 0:
                found.add(value)
    return found


def compile_warmup_steps(guard: Any, minimum: int) -> int:
    """Untimed steps for a compiled loop under ``guard``: one whole period of its cadences (their least common
    multiple; every combination of due probes comes once in it), plus 2 (the step after the first one that measured
    finds the tap's sums set: one more graph), at least ``minimum``, at most `MAX_WARMUP`."""
    return max(minimum, min(MAX_WARMUP, math.lcm(*cadences(guard)) + 2))


def graphs_compiled() -> int:
    """Graphs dynamo has captured in this process so far (each recompilation and graph break adds one)."""
    return int(counters["stats"]["unique_graphs"])
