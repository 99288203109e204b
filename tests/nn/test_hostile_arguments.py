"""keel.nn's public constructors against hostile arguments: one ValueError naming the argument and the value, at
construction (a bool where a number or a size goes, NaN/inf, another type), never a torch TypeError from inside, a
late failure, or a silently odd module (``SigmaReparamLinear(True, 3)`` was a layer with one input)."""

from __future__ import annotations

import pytest
import torch

from keel.losses import z_loss
from keel.nn import (
    DenseToSparseSchedule,
    LongSkipCalibration,
    LongSkipScaling,
    MomentumResidualHook,
    MomentumState,
    PowerNorm,
    QKNorm,
    SigmaReparamLinear,
    StableMax,
    ZLossHook,
    create_stabilizer,
)

SCHEDULE = dict(hard_step=10, decay_steps=5)
CASES = [
    # (what is built, the arguments, the argument the error must name)
    (QKNorm, dict(head_dim=True), "head_dim"),
    (QKNorm, dict(head_dim=16, eps=True), "eps"),
    (PowerNorm, dict(num_features=True), "num_features"),
    (PowerNorm, dict(num_features=8, alpha_fwd=True), "alpha_fwd"),
    (PowerNorm, dict(num_features=8, warmup_iters=False), "warmup_iters"),
    (PowerNorm, dict(num_features=8, groups=True), "groups"),
    (PowerNorm, dict(num_features=8, affine=0), "affine"),
    (PowerNorm, dict(num_features=8, affine="yes"), "affine"),
    (PowerNorm, dict(num_features=8, reference_backward=1), "reference_backward"),
    (SigmaReparamLinear, dict(in_features=True, out_features=3), "in_features"),
    (SigmaReparamLinear, dict(in_features=4, out_features="3"), "out_features"),
    (SigmaReparamLinear, dict(in_features=4.0, out_features=3), "in_features"),
    (StableMax, dict(dim="x"), "dim"),
    (StableMax, dict(dim=True), "dim"),
    (StableMax, dict(log="no"), "log"),
    (LongSkipScaling, dict(num_skips=True), "num_skips"),
    (LongSkipScaling, dict(num_skips=10**30), "num_skips"),  # built a list of 10**30 factors forever
    (LongSkipScaling, dict(num_skips=3, kappa="x"), "kappa"),
    (LongSkipScaling, dict(num_skips=3, kappa=None), "kappa"),
    (LongSkipCalibration, dict(size=16, reduction=True), "reduction"),
    (ZLossHook, dict(coefficient=True), "coefficient"),
    (MomentumResidualHook, dict(state=MomentumState(), momentum=float("nan")), "momentum"),
    (MomentumResidualHook, dict(state=MomentumState(), momentum=-1), "momentum"),
    (MomentumResidualHook, dict(state=MomentumState(), momentum=True), "momentum"),
    (MomentumResidualHook, dict(state=MomentumState(), step_size=float("inf")), "step_size"),
    (MomentumResidualHook, dict(state=MomentumState(), step_size=0), "step_size"),
    (MomentumResidualHook, dict(state=MomentumState(), step_size="x"), "step_size"),
    (DenseToSparseSchedule, dict(SCHEDULE, hard_step=float("nan")), "hard_step"),
    (DenseToSparseSchedule, dict(SCHEDULE, hard_step=-1), "hard_step"),
    (DenseToSparseSchedule, dict(SCHEDULE, hard_step=True), "hard_step"),
    (DenseToSparseSchedule, dict(SCHEDULE, decay_steps="x"), "decay_steps"),
    (DenseToSparseSchedule, dict(SCHEDULE, decay_steps=0), "decay_steps"),
    (DenseToSparseSchedule, dict(SCHEDULE, decay_steps=None), "decay_steps"),
    (DenseToSparseSchedule, dict(SCHEDULE, tau_max=-1.0), "tau_max"),
    (DenseToSparseSchedule, dict(SCHEDULE, tau_min=float("nan")), "tau_min"),
    (DenseToSparseSchedule, dict(SCHEDULE, tau_min=0.0), "tau_min"),
    (DenseToSparseSchedule, dict(SCHEDULE, schedule="cosine"), "schedule"),
    (DenseToSparseSchedule, dict(SCHEDULE, threshold=float("inf")), "threshold"),
    (DenseToSparseSchedule, dict(SCHEDULE, update=2.5), "update"),
    (DenseToSparseSchedule, dict(SCHEDULE, update=float("nan")), "update"),
    (DenseToSparseSchedule, dict(SCHEDULE, update=-2), "update"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"), CASES, ids=[f"{c[0].__name__}-{c[2]}-{i}" for i, c in enumerate(CASES)]
)
def test_a_hostile_argument_is_one_value_error_naming_it(factory, kwargs, name) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b.*allowed"):
        factory(**kwargs)


def test_z_loss_refuses_a_bool_coefficient() -> None:
    with pytest.raises(ValueError, match="coefficient=True; allowed"):
        z_loss(torch.zeros(2, 3), coefficient=True)


def test_the_ordinary_arguments_still_build() -> None:
    """The checks let through what the docs use: ints for sizes, ints or floats for numbers."""
    QKNorm(16, eps=1)
    PowerNorm(8, alpha_fwd=1, alpha_bkw=0, warmup_iters=0, groups=None, affine=False, reference_backward=True)
    SigmaReparamLinear(4, 3)
    StableMax(0, log=True)
    LongSkipScaling(3, kappa=1)
    MomentumResidualHook(MomentumState(), momentum=0, step_size=2)
    DenseToSparseSchedule(hard_step=0, decay_steps=1, tau_max=1, tau_min=0.5, schedule="linear", threshold=0, update=-1)


@pytest.mark.parametrize(("name", "options"), [("qk_norm", dict(eps=True)), ("scale_long", dict(kappa=True))])
def test_a_stabilizer_refuses_a_bool_number_when_created(name, options) -> None:
    """``create_stabilizer("qk_norm", eps=True)`` was accepted and failed only inside `stabilize` (QKNorm's check)."""
    with pytest.raises(ValueError, match=rf"{next(iter(options))}=True; allowed"):
        create_stabilizer(name, **options)
