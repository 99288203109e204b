"""Per-example attribution (`keel.signals.attribution`): the ranking against an independent float64 derivation,
per-example losses that leave the model and every RNG stream as they were, and per-example gradient norms by vmap
and by the loop fallback against a float64 per-example backward pass."""

from __future__ import annotations

import math
import re
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import keel
from keel.signals.attribution import (
    MAD_TO_SIGMA,
    Attribution,
    batch_size,
    example_grad_norms,
    example_losses,
    rank_offenders,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_scores(values: list[float]) -> np.ndarray:
    """The documented rule, by numpy in float64: (v - median) / (1.4826 MAD), the mean absolute deviation when the
    MAD is 0, 0 when that is 0 too, inf for a non-finite value."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    scores = np.full(v.shape, np.inf)
    if finite.any():
        median = np.median(v[finite])
        spread = MAD_TO_SIGMA * np.median(np.abs(v[finite] - median))
        if not spread > 0:
            spread = np.mean(np.abs(v[finite] - median))
        scores[finite] = (v[finite] - median) / spread if spread > 0 else 0.0
    return scores


VALUES = st.lists(
    st.floats(-1e4, 1e4, allow_nan=False) | st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 1.0]),
    min_size=1,
    max_size=40,
)


@given(VALUES, st.integers(1, 50), st.floats(0.5, 10))
@example([0.0, 5e-324, -1.0], 3, 1.0)  # a value far below a zero spread: z −inf, no offender (found in a CI-like run)
@settings(max_examples=200, deadline=None)
def test_rank_offenders_matches_a_float64_numpy_derivation(values: list[float], top_k: int, z: float) -> None:
    ids = [1000 + n for n in range(len(values))]
    ranked = rank_offenders(values, ids, top_k=top_k, z=z)
    ref = reference_scores(values)
    assert len(ranked) == min(top_k, len(values))
    assert len({o.id for o in ranked}) == len(ranked)
    tol = 1e-9 * (1 + np.abs(ref[np.isfinite(ref)]).max(initial=0))
    for o in ranked:
        expected = ref[o.id - 1000]
        assert o.value == values[o.id - 1000] or (math.isnan(o.value) and math.isnan(values[o.id - 1000]))
        assert o.z == expected or abs(o.z - expected) <= tol
        if abs(expected - z) > tol:
            assert o.outlier == (expected > z or expected == math.inf)  # far below the median (z −inf) is no offender
    left_out = set(range(len(values))) - {o.id - 1000 for o in ranked}
    if left_out and ranked:  # nothing left out scores above the last one kept
        assert max(ref[i] for i in left_out) <= ranked[-1].z + tol
    assert all(a.z >= b.z - tol for a, b in zip(ranked, ranked[1:], strict=False))


def test_non_finite_values_rank_first_and_are_outliers() -> None:
    ranked = rank_offenders([1.0, math.nan, 50.0, math.inf, 1.2, -math.inf], [0, 1, 2, 3, 4, 5], top_k=6, z=6)
    assert {o.id for o in ranked[:3]} == {1, 3, 5}
    assert all(o.z == math.inf and o.outlier for o in ranked[:3])


def test_an_all_equal_batch_has_z_zero_and_no_outlier() -> None:
    ranked = rank_offenders([2.5] * 16, list(range(16)), top_k=16, z=1)
    assert [o.z for o in ranked] == [0.0] * 16 and not any(o.outlier for o in ranked)


def test_one_outlier_among_equal_values_has_mad_zero_and_scores_the_batch_size() -> None:
    # MAD 0: the mean absolute deviation (4/32) stands in, so the lone outlier's z is 4 / (4/32) = 32
    values = [1.0] * 31 + [5.0]
    ranked = rank_offenders(values, list(range(32)), top_k=2, z=6)
    assert ranked[0].id == 31 and ranked[0].z == pytest.approx(32) and ranked[0].outlier
    assert ranked[1].z == 0.0 and not ranked[1].outlier


def test_rank_offenders_refuses_a_value_count_that_is_not_the_id_count() -> None:
    with pytest.raises(ValueError, match="3 values for 2 example ids"):
        rank_offenders([1.0, 2.0, 3.0], [0, 1], top_k=2, z=6)


class Net(nn.Module):
    """Dropout and batch norm: the two ways a forward pass can draw random numbers or change the model."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 3)
        self.skip = nn.Linear(6, 3)  # past the batch norm: an extreme input makes extreme logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.inp(x))))) + self.skip(x)


def per_example(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def make_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_example_losses_leave_rng_train_flags_and_batch_norm_statistics_untouched() -> None:
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.out.eval()  # a mixed model: each module's own flag must come back
    model(make_batch(16, seed=1)[0])  # running statistics that are not the initial ones
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batch = make_batch()
    losses = example_losses(model, per_example, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(losses, per_example(model, batch))  # measured as in eval mode: no dropout draw


def test_example_grad_norms_leave_rng_train_flags_grads_and_statistics_untouched() -> None:
    torch.manual_seed(0)
    model = Net().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    example_grad_norms(model, per_example, make_batch())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())  # type: ignore[arg-type]


def reference_grad_norms(model: nn.Module, loss_fn, batch, rows, n: int) -> list[float]:
    """One float64 backward pass per example on a copy of the model, by hand."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    norms = []
    for i in range(n):
        twin.zero_grad()
        loss_fn(twin, rows(batch, i)).sum().backward()
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in twin.parameters() if p.grad is not None)))
    return norms


def tuple_row(batch, i):
    return (batch[0][i : i + 1].double(), batch[1][i : i + 1])


class DataDependent(nn.Module):
    """A forward pass vmap cannot run: Python control flow on a tensor's value (``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if h.abs().max().item() > 10:  # never true; vmap refuses the .item() anyway
            h = h * 0
        return self.out(h)


class InPlaceOnInput(nn.Module):
    """A forward pass vmap cannot run: an in-place op writes the (batched) input into an unbatched buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(6)
        scale.mul_(x.abs().mean(0).clamp(max=0))  # 0 whatever x is: the output is the plain MLP's
        return self.out(torch.tanh(self.inp(x + scale)))


@pytest.mark.parametrize(("model_cls", "how"), [(Net, "vmap"), (DataDependent, "loop"), (InPlaceOnInput, "loop")])
def test_grad_norms_match_a_float64_per_example_backward(model_cls, how: str) -> None:
    torch.manual_seed(0)
    model = model_cls()
    batch = make_batch(6)
    norms, used = example_grad_norms(model, per_example, batch)
    assert used == how
    expected = reference_grad_norms(model, per_example, batch, tuple_row, 6)
    assert norms.dtype == torch.float32 and norms.shape == (6,)
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-5)


def test_vmap_and_loop_agree_on_the_same_model() -> None:
    torch.manual_seed(0)
    model, batch = Net(), make_batch(6)
    by_vmap, how = example_grad_norms(model, per_example, batch)
    assert how == "vmap"
    from keel.signals import attribution

    names = [n for n, p in model.named_parameters()]
    with attribution._side_effect_free(model):
        by_loop = attribution._looped_grad_norms(model, per_example, batch, names)
    torch.testing.assert_close(by_vmap, by_loop, rtol=1e-5, atol=1e-6)


Pair = namedtuple("Pair", ["features", "labels"])


@pytest.mark.parametrize(
    ("batch", "loss_fn", "rows"),
    [
        (
            {"x": make_batch(5)[0], "y": make_batch(5)[1], "note": "kept as is"},
            lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"),
            lambda b, i: {"x": b["x"][i : i + 1].double(), "y": b["y"][i : i + 1]},
        ),
        (
            Pair(*make_batch(5)),
            lambda m, b: F.cross_entropy(m(b.features), b.labels, reduction="none"),
            lambda b, i: Pair(b.features[i : i + 1].double(), b.labels[i : i + 1]),
        ),
    ],
    ids=["dict", "namedtuple"],
)
def test_grad_norms_of_dict_and_namedtuple_batches(batch, loss_fn, rows) -> None:
    torch.manual_seed(0)
    model = Net()
    if isinstance(batch, dict):
        batch = {k: v for k, v in batch.items() if k != "note"}  # vmap maps tensors; a string has no example dim
    norms, how = example_grad_norms(model, loss_fn, batch)
    assert how == "vmap"
    np.testing.assert_allclose(norms.numpy(), reference_grad_norms(model, loss_fn, batch, rows, 5), rtol=1e-5)
    assert torch.equal(example_losses(model, loss_fn, batch), example_losses(model, loss_fn, batch))


def test_a_batch_holding_a_non_tensor_falls_back_to_the_loop_and_still_measures() -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = make_batch(5)
    batch = {"x": x, "y": y, "note": "not a tensor"}
    norms, how = example_grad_norms(model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), batch)
    expected = reference_grad_norms(model, per_example, (x, y), tuple_row, 5)
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-5)
    assert how in {"vmap", "loop"}


WRONG_SHAPES = {
    "the batch mean": lambda m, b: per_example(m, b).mean(),
    "a column": lambda m, b: per_example(m, b)[:, None],
    "one short": lambda m, b: per_example(m, b)[1:],
    "per class": lambda m, b: (
        F.cross_entropy(m(b[0]), F.one_hot(b[1], 3).float(), reduction="none")[:, None] * torch.ones(3)
    ),
    "a list": lambda m, b: per_example(m, b).tolist(),
}


@pytest.mark.parametrize("loss_fn", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_example_losses_refuse_a_loss_fn_that_does_not_return_one_loss_per_example(loss_fn) -> None:
    with pytest.raises(ValueError, match="loss_fn returned .*allowed: a 1-d tensor of 8 values"):
        example_losses(Net(), loss_fn, make_batch())


@pytest.mark.parametrize("name", ["the batch mean", "a column", "per class"])
def test_example_grad_norms_refuse_a_loss_fn_that_does_not_return_one_loss_per_example(name: str) -> None:
    # the batch mean of a one-example batch is that example's loss: without a check, a loss_fn that averages
    # would pass here and fail only later, inside a Guard, on a bad step
    with pytest.raises(ValueError, match=r"loss_fn \(on one example\) returned .*allowed: a 1-d tensor of 1 values"):
        example_grad_norms(Net(), WRONG_SHAPES[name], make_batch())


@pytest.mark.parametrize(
    ("batch", "named"),
    [(("a", 3), "[]"), ((torch.zeros(4, 2), torch.zeros(3)), "[3, 4]"), ({}, "[]"), (torch.tensor(1.0), "[]")],
)
def test_batch_size_refuses_a_batch_without_one_example_dimension(batch, named: str) -> None:
    with pytest.raises(ValueError, match=f"first dimensions {re.escape(named)}.*allowed"):
        batch_size(batch)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loss_fn": "per_example"}, "loss_fn"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"z": 0}, "z"),
        ({"z": -1.0}, "z"),
        ({"z": math.nan}, "z"),
        ({"z": math.inf}, "z"),
        ({"grad_norms": "yes"}, "grad_norms"),
    ],
)
def test_attribution_refuses_bad_settings_naming_the_field(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"Attribution.{named}=.*allowed"):
        Attribution(**{"loss_fn": per_example, **kwargs})


def _train(guard_attribution: Attribution | None, *, guarded: bool) -> tuple[dict, list]:
    """40 steps of a dropout + batch-norm net on batches of 16; step 30's batch holds one extreme example."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(640, 6, generator=gen), torch.randint(0, 3, (640,), generator=gen)
    x[486] *= 300.0
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = keel.Guard(model, opt, policy="observe", attribution=guard_attribution) if guarded else None
    for step in range(40):
        batch = (x[16 * step : 16 * step + 16], y[16 * step : 16 * step + 16])
        loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        if guard is not None:
            guard.step(loss, batch_ids=range(16 * step, 16 * step + 16), batch=batch)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    findings = []
    if guard is not None:
        guard.close()
        findings = guard.findings
    return {k: v.clone() for k, v in model.state_dict().items()}, findings


def test_observe_with_attribution_trains_bit_identically_to_the_bare_loop() -> None:
    bare, _ = _train(None, guarded=False)
    guarded, findings = _train(Attribution(loss_fn=per_example, grad_norms=True), guarded=True)
    attributed = [f for f in findings if "offenders" in f.evidence]
    assert attributed, "the extreme example must raise a finding, or this test proves nothing"
    assert attributed[0].evidence["offenders"][0]["id"] == 486
    assert attributed[0].evidence["grad_norms_by"] == "vmap"
    assert bare.keys() == guarded.keys()
    for key in bare:
        assert torch.equal(bare[key], guarded[key]), key
