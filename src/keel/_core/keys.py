"""Signal keys: stable slash paths shared by probes, detectors, the store and the report.

Every key keel emits or reads is declared here once and imported everywhere else (``tests/_core/test_keys.py``
finds a retyped literal). A key ending in ``/`` names a family, one value per parameter, layer, block, head or
rank: ``grad/norm/`` holds one value per parameter, stored as ``grad/norm/<parameter name>``. The name says which
(``_PER_PARAM``, ``_PER_LAYER``, ...). Each probe's docstring tables the keys it emits, their cost and cadence.
"""

from __future__ import annotations

# The loop's own values (signals/loss.py, grad_norm.py, param_norm.py, update_ratio.py; the Guard)
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
VAL_LOSS = "val/loss"  # read from a log by keel doctor; a loop's validation loss

# Attention (signals/attn_logits.py, attn_entropy.py)
ATTN_MAX_LOGIT = "attn/max_logit"
ATTN_MAX_LOGIT_PER_LAYER = "attn/max_logit/"
ATTN_ENTROPY = "attn/entropy"
ATTN_ENTROPY_PER_LAYER = "attn/entropy/"
ATTN_HEAD_ENTROPY_PER_HEAD = "attn/head_entropy/"  # stored as attn/head_entropy/<layer>/h<i>

# Output logits (signals/output_logits.py)
LOGITS_LOG_Z = "logits/log_z"
LOGITS_LOG_Z_MAX = "logits/log_z_max"
LOGITS_LOG_Z_MIN = "logits/log_z_min"
LOGITS_RMS = "logits/rms"
LOGITS_MEAN = "logits/mean"
LOGITS_SOFTMAX_COLLAPSE = "logits/softmax_collapse"
LOGITS_ZERO_LOSS = "logits/zero_loss"

# Gradient-weight alignment (signals/grad_weight_cos.py)
GRAD_WEIGHT_COS = "grad/weight_cos"
GRAD_WEIGHT_COS_PER_PARAM = "grad/weight_cos/"

# Activations (signals/activation_rms.py)
ACT_RMS = "act/rms"
ACT_RMS_PER_BLOCK = "act/rms/"
ACT_MAX_ABS = "act/max_abs"
ACT_MAX_ABS_PER_BLOCK = "act/max_abs/"

# Adam's ε (signals/adam_eps.py)
ADAM_UPDATE_RMS = "adam/update_rms"
ADAM_EPS_DOMINATED = "adam/eps_dominated"
ADAM_EPS_DOMINATED_PER_PARAM = "adam/eps_dominated/"

# Curvature (signals/sharpness.py)
CURVATURE_SHARPNESS = "curvature/sharpness"
CURVATURE_TRACE = "curvature/trace"
CURVATURE_PRECONDITIONED_SHARPNESS = "curvature/preconditioned_sharpness"
CURVATURE_MARGIN = "curvature/margin"

# One value per rank under torchrun (guard/distributed.py writes them, guard/rank_outlier.py reads them)
RANK_LOSS_PER_RANK = "rank/loss/"
RANK_GRAD_NORM_PER_RANK = "rank/grad/norm/"
RANK_GRAD_LOCAL_NORM_PER_RANK = "rank/grad/local_norm/"
RANK_GRAD_COS_PER_RANK = "rank/grad/cos/"


def per_param(family: str, name: str) -> str:
    """The stored key of one member of a family: ``per_param("grad/norm/", "fc.weight")``.

    Example:
        >>> per_param(GRAD_NORM_PER_PARAM, "fc.weight")
        'grad/norm/fc.weight'
    """
    if not (isinstance(family, str) and family.endswith("/")):
        raise ValueError(f"family={family!r} is not a per-parameter family (must end with '/')")
    return family + name
