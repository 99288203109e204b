"""Stabilizing modules and the surgery that applies them to an existing model (`stabilize`)."""

from keel.nn.checkpoint import load_stabilized, stabilize_record
from keel.nn.dense_to_sparse_gate import DenseToSparseHook, DenseToSparseSchedule
from keel.nn.fake_quant import FakeQuantizer, FakeQuantLinear, fake_quantize, list_quantizers
from keel.nn.momentum_smoe import MomentumResidualHook, MomentumState
from keel.nn.power_norm import PowerNorm
from keel.nn.qk_norm import QKNorm
from keel.nn.qk_norm_attention import QKNormMultiheadAttention
from keel.nn.router_aux_loss import RouterAuxLossHook, set_router_loss_scale
from keel.nn.scale_long import LongSkipCalibration, LongSkipScaling, scale_long_factors
from keel.nn.sigma_reparam import SigmaReparam, SigmaReparamLinear
from keel.nn.stabilize import StabilizeResult, create_stabilizer, list_stabilizers, stabilize
from keel.nn.stabilizers import NoDecayGroupWarning, StabilizerNoEffectWarning
from keel.nn.stablemax import StableMax
from keel.nn.statsq import StatsQuantizer
from keel.nn.z_loss_hook import ZLossHook

__all__ = [
    "DenseToSparseHook",
    "DenseToSparseSchedule",
    "FakeQuantLinear",
    "FakeQuantizer",
    "MomentumResidualHook",
    "MomentumState",
    "RouterAuxLossHook",
    "set_router_loss_scale",
    "LongSkipCalibration",
    "LongSkipScaling",
    "NoDecayGroupWarning",
    "PowerNorm",
    "QKNorm",
    "QKNormMultiheadAttention",
    "StabilizerNoEffectWarning",
    "SigmaReparam",
    "SigmaReparamLinear",
    "StabilizeResult",
    "StableMax",
    "StatsQuantizer",
    "ZLossHook",
    "create_stabilizer",
    "fake_quantize",
    "list_quantizers",
    "list_stabilizers",
    "load_stabilized",
    "scale_long_factors",
    "stabilize",
    "stabilize_record",
]
