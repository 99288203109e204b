"""The remedies `keel.stabilize` can apply; each file registers one under its stem."""

from keel.nn.remedies._base import Change, NoDecayGroupWarning, Remedy, RemedyNoEffectWarning, remedies
from keel.nn.remedies.qk_norm import QKNormRemedy
from keel.nn.remedies.scale_long import ScaleLongRemedy
from keel.nn.remedies.sigma_reparam import SigmaReparamRemedy
from keel.nn.remedies.z_loss import ZLossRemedy

__all__ = [
    "Change",
    "NoDecayGroupWarning",
    "QKNormRemedy",
    "Remedy",
    "RemedyNoEffectWarning",
    "ScaleLongRemedy",
    "SigmaReparamRemedy",
    "ZLossRemedy",
    "remedies",
]
