"""keel's optimizers under CPU autocast: float32 parameters, gradients from a bf16/fp16 forward pass.

Autocast changes the forward pass, never the optimizer's arithmetic: an ``optimizer.step()`` called inside an
autocast region (a loop that calls `keel.Guard.step` there) must equal the same step outside it, bit for bit,
and a few steps from autocast gradients must stay finite and land near a float32 run. The foreach paths (the
ones accelerators take) and the CPU defaults are both stepped. bf16/fp16 *parameters* on every kernel are in
`tests/optim/test_dtype_matrix.py`; the CUDA twin is in `tests/gpu/test_cuda_autocast.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from keel.optim import create_optimizer, list_optimizers
from keel.proxy import create_proxy_model

SETTINGS: dict[str, dict] = {  # small periods, so five steps clip, reset and warm up
    "spam": dict(lr=3e-3, grace_steps=1, reset_interval=3, warmup_steps=2, threshold=2.0),
    "stable_spam": dict(lr=3e-3, reset_interval=3),
    "orthograd": dict(lr=3e-3),
    "independent_adamw": dict(lr=3e-3, weight_decay=0.1),
}
KERNELS = {"spam": [None, True], "stable_spam": [None, True], "orthograd": [None], "independent_adamw": [None, True]}
CASES = [(name, foreach) for name in sorted(SETTINGS) for foreach in KERNELS[name]]
AUTOCAST = [torch.bfloat16, torch.float16]
STEPS = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_registered_optimizer_is_covered() -> None:
    assert sorted(SETTINGS) == list_optimizers()


def _make(name: str, foreach: bool | None, model: torch.nn.Module) -> torch.optim.Optimizer:
    kwargs = dict(SETTINGS[name], **({} if foreach is None else {"foreach": foreach}))
    return create_optimizer(name, model.parameters(), **kwargs)


def _batches(device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (4, 17), generator=gen).to(device) for _ in range(STEPS)]


def _backward(model: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype | None) -> None:
    with torch.autocast(batch.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        v for state in optimizer.state_dict()["state"].values() for v in state.values() if isinstance(v, torch.Tensor)
    ]


def check_step_inside_autocast_equals_step_outside(
    name: str, foreach: bool | None, dtype: torch.dtype, device: str
) -> None:
    """Five steps on autocast gradients, one optimizer stepped inside an autocast region and a copy outside it:
    parameters and state stay bit-identical, float32 and finite."""
    torch.manual_seed(0)
    inside = create_proxy_model("tiny", seq_len=16).to(device)
    outside = copy.deepcopy(inside)
    opt_in, opt_out = _make(name, foreach, inside), _make(name, foreach, outside)
    for batch in _batches(device):
        _backward(inside, batch, dtype)
        for p, q in zip(inside.parameters(), outside.parameters(), strict=True):
            q.grad = p.grad.clone()  # the same float32 gradients (⊥Grad projects them in place)
        with torch.autocast(device, dtype=dtype):
            opt_in.step()
        opt_out.step()
        assert torch.equal(_flat(inside), _flat(outside))
        a, b = _state(opt_in), _state(opt_out)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        opt_in.zero_grad(set_to_none=True)
        opt_out.zero_grad(set_to_none=True)
    assert torch.isfinite(_flat(inside)).all()
    assert {p.dtype for p in inside.parameters()} == {torch.float32}


def check_training_lands_near_float32(
    name: str,
    foreach: bool | None,
    device: str,
    *,
    autocast: torch.dtype | None = None,
    params: torch.dtype = torch.float32,
) -> None:
    """Five steps with autocast gradients (``autocast``) or low-precision parameters (``params``) stay finite and
    end within 15 % of the distance a float32 run moved (plus twice what rounding the start to ``params`` moved)."""
    runs = {}
    for low in (False, True):
        torch.manual_seed(0)
        model = create_proxy_model("tiny", seq_len=16).to(device)
        start = _flat(model)
        model = model.to(params if low else torch.float32)
        optimizer = _make(name, foreach, model)
        for batch in _batches(device):
            _backward(model, batch, autocast if low else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[low] = _flat(model)
    ref, got = runs[False], runs[True]
    assert torch.isfinite(got).all()
    moved, off = (ref - start).norm(), (got - ref).norm()
    rounding = (start.to(params).double() - start).norm()
    assert off <= 0.15 * moved + 2 * rounding, f"ended {off:.3g} from float32, which moved {moved:.3g}"


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_a_step_inside_autocast_equals_the_same_step_outside(
    name: str, foreach: bool | None, dtype: torch.dtype
) -> None:
    check_step_inside_autocast_equals_step_outside(name, foreach, dtype, "cpu")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_training_from_autocast_gradients_stays_finite_and_near_float32(
    name: str, foreach: bool | None, dtype: torch.dtype
) -> None:
    check_training_lands_near_float32(name, foreach, "cpu", autocast=dtype)
