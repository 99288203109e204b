"""keel's stabilizer modules in bfloat16 and float16, and in float32 under bf16 autocast, against a float64 copy on
the same inputs: output and input gradient within a few units of rounding of the dtype (docs/low_precision.md,
"keel's stabilizers in bfloat16 and float16"), at input scales 1 and 300 (fp16 activation growth)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import keel.nn as kn
from tests.nn._models import SelfAttention

EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ULPS = 4.0  # measured worst: 2.1 (QKNormMultiheadAttention under autocast)


MODULES = {
    "qk_norm": (lambda: kn.QKNorm(16), (2, 3, 5, 16)),
    "qk_norm_rms": (lambda: kn.QKNorm(16, kind="rms"), (2, 3, 5, 16)),
    "sigma_reparam": (lambda: kn.SigmaReparamLinear(16, 8), (4, 16)),
    "stablemax": (lambda: kn.StableMax(), (4, 10)),
    "stablemax_log": (lambda: kn.StableMax(log=True), (4, 10)),
    "qk_norm_attention": (SelfAttention, (2, 5, 16)),
    "statsq": (lambda: kn.fake_quantize(nn.Sequential(nn.Linear(16, 8)), "statsq", exclude=()), (4, 16)),
    "power_norm": (lambda: kn.PowerNorm(16, warmup_iters=4), (4, 6, 16)),
}
MODES = ["bfloat16", "float16", "autocast-bfloat16"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scale", [1.0, 300.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODULES))
def test_within_a_few_units_of_rounding_of_float64(name: str, mode: str, scale: float) -> None:
    build, shape = MODULES[name]
    torch.manual_seed(0)
    module = build()
    reference = copy.deepcopy(module).double()
    dtype = torch.float16 if mode == "float16" else torch.bfloat16
    autocast = mode.startswith("autocast")
    if not autocast:
        module = module.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale
    x = (x if autocast else x.to(dtype)).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    y64 = reference(x64)
    weight = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (y.double() * weight).sum().backward()
    (y64 * weight).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert _relative(y, y64) <= ULPS * EPS[dtype]
    assert _relative(x.grad, x64.grad) <= ULPS * EPS[dtype]
