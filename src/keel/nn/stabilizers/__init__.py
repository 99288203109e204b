"""The stabilizers `keel.stabilize` can apply; each file registers one under its stem."""

from keel.nn.stabilizers._base import Change, NoDecayGroupWarning, Stabilizer, StabilizerNoEffectWarning, stabilizers
from keel.nn.stabilizers.qk_norm import QKNormStabilizer
from keel.nn.stabilizers.scale_long import ScaleLongStabilizer
from keel.nn.stabilizers.sigma_reparam import SigmaReparamStabilizer
from keel.nn.stabilizers.z_loss import ZLossStabilizer

__all__ = [
    "Change",
    "NoDecayGroupWarning",
    "QKNormStabilizer",
    "Stabilizer",
    "StabilizerNoEffectWarning",
    "ScaleLongStabilizer",
    "SigmaReparamStabilizer",
    "ZLossStabilizer",
    "stabilizers",
]
