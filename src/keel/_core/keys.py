"""Signal keys: stable slash paths shared by probes, detectors, the store and the report.

A key ending in ``/`` names a per-parameter family: ``grad/norm/`` holds one value per parameter, stored
as ``grad/norm/<parameter name>``.
"""

from __future__ import annotations

LOSS = "loss"
GRAD_NORM = "grad/norm"
GRAD_NORM_PER_PARAM = "grad/norm/"
GRAD_CLIPPED_NORM = "grad/clipped_norm"  # after the loop's own clipping, when it clips (Guard.step(grad_norm=))
PARAM_NORM = "param/norm"
PARAM_NORM_PER_PARAM = "param/norm/"
UPDATE_NORM = "update/norm"
UPDATE_RATIO = "update/ratio"
UPDATE_RATIO_PER_PARAM = "update/ratio/"
LR = "lr"
STEP_TIME = "time/step"
AMP_SCALE = "amp/scale"


def per_param(family: str, name: str) -> str:
    """The stored key of one parameter in a family: ``per_param("grad/norm/", "fc.weight")``."""
    if not family.endswith("/"):
        raise ValueError(f"family={family!r} is not a per-parameter family (must end with '/')")
    return family + name
