"""Every keel optimizer × parameter dtype (float64, float32, bfloat16, float16) × the kernels it picks on CPU.

The same small regression from the same initial weights, five steps: the step runs, the weights stay finite,
the float64 run agrees with the float32 run to float32 rounding, and bf16/fp16 runs agree loosely (their
weights move like float32's, within a fraction of the distance float32 moved). Also a bf16 and a float32
parameter group in one optimizer.
"""

from __future__ import annotations

import copy

import pytest
import torch

from keel.optim import AdaClip, OrthoGrad, create_optimizer, list_optimizers

SETTINGS: dict[str, dict] = {
    "spam": dict(lr=3e-2, grace_steps=1, reset_interval=3, warmup_steps=2, threshold=2.0),  # clips and resets
    "stable_spam": dict(lr=3e-2, reset_interval=3),
    "orthograd": dict(lr=3e-2),
    "independent_adamw": dict(lr=3e-2, weight_decay=0.1),
}
KERNELS = {
    "spam": [None, True, False],
    "stable_spam": [None, True, False],
    "orthograd": [None],
    "independent_adamw": [None, True, False],
}  # foreach=None/True/False (None: what it picks on CPU)
CASES = [(name, foreach) for name in sorted(SETTINGS) for foreach in KERNELS[name]]
LOW = [torch.bfloat16, torch.float16]
STEPS = 5


def test_every_registered_optimizer_is_in_the_matrix() -> None:
    assert sorted(SETTINGS) == list_optimizers()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _train(model: torch.nn.Module, make_optimizer, steps: int = STEPS) -> torch.Tensor:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    optimizer = make_optimizer(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        dtype = next(model.parameters()).dtype
        (model(x.to(dtype)).float() - y).square().mean().backward()
        optimizer.step()
    return _flat(model)


def _assert_loosely(got: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, dtype: torch.dtype) -> None:
    """bf16/fp16 weights end near float32's: within 15 % of the distance float32 moved, plus twice what rounding the
    initial weights to ``dtype`` already changed."""
    assert torch.isfinite(got).all()
    moved, rounding = (ref - start).norm(), (start.to(dtype).double() - start).norm()
    off = (got - ref).norm()
    assert off <= 0.15 * moved + 2 * rounding, f"{dtype} ended {off:.3g} from float32, which moved {moved:.3g}"


def _run(name: str, foreach: bool | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = dict(SETTINGS[name], **({} if foreach is None else {"foreach": foreach}))
    model = _model().to(dtype)
    start = _flat(model)
    return start, _train(model, lambda params: create_optimizer(name, params, **kwargs))


@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_float64_agrees_with_float32(name: str, foreach: bool | None) -> None:
    _, ref = _run(name, foreach, torch.float32)
    _, got = _run(name, foreach, torch.float64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _float16_refused(name: str) -> bool:
    # torch's AdamW keeps its moments in the parameters' dtype: 1e-3·g² underflows float16 for |g| < 7.7e-3 and ε
    # rounds to 0, so its first float16 step is NaN (or, fused, a jump of ~100× the float32 step). keel refuses
    # it as OrthoGrad's default base (the base is the user's choice); IndependentAdamW keeps float32 moments.
    return name == "orthograd"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_low_precision_runs_finite_and_agrees_loosely(name: str, foreach: bool | None, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and _float16_refused(name):
        with pytest.raises(ValueError, match="float16"):
            _run(name, foreach, dtype)
        return
    start, ref = _run(name, foreach, torch.float32)
    _, got = _run(name, foreach, dtype)
    _assert_loosely(got, ref, start, dtype)


# torch's own Adam in float16 is the base optimizer's problem (keel's factory refuses it as the default base)
ORTHOGRAD_CASES = [
    (base, dtype)
    for base in (torch.optim.SGD, torch.optim.Adam)
    for dtype in (torch.float64, *LOW)
    if not (base is torch.optim.Adam and dtype == torch.float16)
]


@pytest.mark.parametrize(("base", "dtype"), ORTHOGRAD_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_orthograd_projection_in_every_dtype(base, dtype: torch.dtype) -> None:
    make = lambda params: OrthoGrad(base(params, lr=3e-2))  # noqa: E731
    start = _flat(_model())
    ref = _train(_model(), make)
    got = _train(_model().to(dtype), make)
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    else:
        _assert_loosely(got, ref, start, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW], ids=str)
def test_ada_clip_in_every_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(20, 8, generator=gen) for _ in range(4)]
    spike = grads[-1].clone()
    spike[3, 2] = 1000.0
    results = {}
    for dt in (torch.float32, dtype):
        p = torch.nn.Parameter(torch.zeros(20, 8, dtype=dt))
        clipper = AdaClip([p])
        for g in grads[:-1] + [spike]:
            p.grad = g.to(dt, copy=True)  # clip_ works in place
            ratio = clipper.clip_()
        results[dt] = (float(ratio), p.grad.double())
    (ratio32, g32), (ratio, g) = results[torch.float32], results[dtype]
    assert torch.isfinite(g).all() and ratio == pytest.approx(ratio32, rel=1e-2)
    top, top32 = float(g.abs().max()), float(g32.abs().max())
    assert top == pytest.approx(top32, rel=1e-2) and top < 500  # the spike of 1000 was clipped (to ~252)


@pytest.mark.parametrize(("name", "foreach"), CASES)
def test_a_bf16_and_a_float32_group_in_one_optimizer(name: str, foreach: bool | None) -> None:
    kwargs = dict(SETTINGS[name], **({} if foreach is None else {"foreach": foreach}))

    class Mixed(torch.nn.Module):
        def __init__(self, low: torch.dtype) -> None:
            super().__init__()
            base = _model()
            self.first, self.second = copy.deepcopy(base[0]).to(low), copy.deepcopy(base[2])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.tanh(self.first(x.to(self.first.weight.dtype)).float()))

    def make(model):
        return lambda params: create_optimizer(
            name, [{"params": model.first.parameters()}, {"params": model.second.parameters()}], **kwargs
        )

    ref_model, model = Mixed(torch.float32), Mixed(torch.bfloat16)
    start = _flat(ref_model)
    ref = _train(ref_model, make(ref_model))
    got = _train(model, make(model))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    _assert_loosely(got, ref, start, torch.bfloat16)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", ["spam", "stable_spam", "independent_adamw"])
def test_low_precision_state_round_trips_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    # Optimizer.load_state_dict casts state to the parameter's dtype: float16 parameters' float32 moments and
    # Stable-SPAM's float32 statistics were rounded, so a rollback did not continue bit for bit
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1)).to(dtype)

    def steps(model, optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            model(x).float().square().mean().backward()
            optimizer.step()

    a = _model().to(dtype)
    opt_a = create_optimizer(name, a.parameters(), **SETTINGS[name])
    steps(a, opt_a, 2)
    b = copy.deepcopy(a)
    opt_b = create_optimizer(name, b.parameters(), **SETTINGS[name])
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    moments = torch.float32 if dtype == torch.float16 else dtype  # float16 keeps float32 moments
    assert {opt_b.state[p]["exp_avg_sq"].dtype for p in b.parameters()} == {moments}
    assert all(
        torch.equal(opt_b.state[p]["exp_avg_sq"], opt_a.state[q]["exp_avg_sq"])
        for p, q in zip(b.parameters(), a.parameters(), strict=True)
    )
    steps(a, opt_a, 3)
    steps(b, opt_b, 3)
    assert torch.equal(_flat(a), _flat(b))


def test_independent_adamw_refuses_amsgrad_or_maximize_with_float16_parameters() -> None:
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    with pytest.raises(ValueError, match=r"float16 parameters with amsgrad=True; allowed"):
        create_optimizer("independent_adamw", params, amsgrad=True)
    opt = create_optimizer("independent_adamw", [torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"maximize=True; allowed"):
        opt.add_param_group({"params": params, "maximize": True})
    assert len(opt.param_groups) == 1
