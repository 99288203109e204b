"""The stabilizers `keel.stabilize` can apply; each file registers one under its stem."""

from keel.nn.stabilizers._base import Change, NoDecayGroupWarning, Stabilizer, StabilizerNoEffectWarning, stabilizers
from keel.nn.stabilizers.dense_to_sparse import DenseToSparseStabilizer
from keel.nn.stabilizers.load_balancing import LoadBalancingStabilizer
from keel.nn.stabilizers.momentum_smoe import MomentumSMoEStabilizer
from keel.nn.stabilizers.qk_norm import QKNormStabilizer
from keel.nn.stabilizers.router_z_loss import RouterZLossStabilizer
from keel.nn.stabilizers.scale_long import ScaleLongStabilizer
from keel.nn.stabilizers.sigma_reparam import SigmaReparamStabilizer
from keel.nn.stabilizers.z_loss import ZLossStabilizer

__all__ = [
    "Change",
    "DenseToSparseStabilizer",
    "LoadBalancingStabilizer",
    "MomentumSMoEStabilizer",
    "NoDecayGroupWarning",
    "QKNormStabilizer",
    "RouterZLossStabilizer",
    "Stabilizer",
    "StabilizerNoEffectWarning",
    "ScaleLongStabilizer",
    "SigmaReparamStabilizer",
    "ZLossStabilizer",
    "stabilizers",
]
