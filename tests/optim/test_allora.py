"""ALLoRA's gradient scaling against a float64 re-derivation, its edge cases and bad arguments, and a peft model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.optim import ALLoRA, NoLoRAFoundWarning, allora_coefficients, apply_allora


def reference_coefficients(theta: np.ndarray, eta: float, granularity: str) -> np.ndarray:
    """c = 1 / sqrt(‖θ‖² + 1/η²) in float64, per row (first axis) or for the whole array."""
    theta = theta.astype(np.float64)
    rows = theta.reshape(1, -1) if granularity == "matrix" or theta.ndim <= 1 else theta.reshape(theta.shape[0], -1)
    return 1.0 / np.sqrt((rows**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)


finite_floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from([(3, 5), (1, 7), (6, 1), (4,), (2, 3, 2)]),
    data=st.data(),
    eta=st.floats(1e-3, 1e3),
    granularity=st.sampled_from(["row", "matrix"]),
)
def test_coefficients_match_float64_formula(shape, data, eta, granularity) -> None:
    values = data.draw(st.lists(finite_floats, min_size=math.prod(shape), max_size=math.prod(shape)))
    theta = torch.tensor(values, dtype=torch.float32).reshape(shape)
    got = allora_coefficients(theta, eta=eta, granularity=granularity)
    expected = reference_coefficients(theta.numpy(), eta, granularity)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_sgd_steps_match_a_float64_rederivation_of_a_lora_layer() -> None:
    """Ten SGD steps of y = W x + B A x under ALLoRA, against the same steps derived by hand in float64."""
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, rank, lr, eta = 6, 5, 2, 0.05, 2.0
    w = torch.randn(n_out, n_in, generator=gen)
    a = torch.nn.Parameter(torch.randn(rank, n_in, generator=gen) / math.sqrt(n_in))
    b = torch.nn.Parameter(torch.zeros(n_out, rank))
    x, target = torch.randn(16, n_in, generator=gen), torch.randn(16, n_out, generator=gen)
    opt = torch.optim.SGD([a, b], lr=lr)
    ALLoRA([a, b], eta=eta).attach(opt)

    a64, b64, w64 = a.detach().double().numpy().copy(), b.detach().double().numpy().copy(), w.double().numpy()
    x64, t64 = x.double().numpy(), target.double().numpy()
    for step in range(10):
        opt.zero_grad()
        (x @ w.T + x @ a.T @ b.T - target).square().mean().backward()
        opt.step()
        # float64: loss = mean((xWᵀ + xAᵀBᵀ − t)²); dL/dy = 2(y − t)/N; gB = dyᵀ(xAᵀ), gA = Bᵀ dyᵀ x.
        dy = 2.0 * (x64 @ w64.T + x64 @ a64.T @ b64.T - t64) / t64.size
        grad_b, grad_a = dy.T @ (x64 @ a64.T), b64.T @ dy.T @ x64
        grad_a *= 1.0 / np.sqrt((a64**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)
        grad_b *= 1.0 / np.sqrt((b64**2).sum(axis=1, keepdims=True) + 1.0 / eta**2)
        a64, b64 = a64 - lr * grad_a, b64 - lr * grad_b
        np.testing.assert_allclose(a.detach().numpy(), a64, rtol=1e-4, atol=1e-6, err_msg=f"A at step {step}")
        np.testing.assert_allclose(b.detach().numpy(), b64, rtol=1e-4, atol=1e-6, err_msg=f"B at step {step}")
    assert np.abs(b64).max() > 1e-3  # B left zero, so the check above compared moving values


def test_zero_parameter_multiplies_its_gradient_by_eta() -> None:
    b = torch.nn.Parameter(torch.zeros(4, 3))
    b.grad = torch.randn(4, 3)
    raw = b.grad.clone()
    ALLoRA([b], eta=3.0).scale_()
    torch.testing.assert_close(b.grad, 3.0 * raw)


def test_non_finite_rows_pass_their_gradient_unchanged_and_finite_rows_are_still_scaled() -> None:
    p = torch.nn.Parameter(torch.ones(4, 2))
    with torch.no_grad():
        p[1, 0], p[2, 1], p[3, 0] = float("nan"), float("inf"), float("-inf")
    p.grad = torch.ones(4, 2)
    ALLoRA([p], eta=2.0).scale_()
    torch.testing.assert_close(p.grad[1:], torch.ones(3, 2))
    torch.testing.assert_close(p.grad[0], torch.full((2,), 1.0 / math.sqrt(2.0 + 0.25)))
    assert torch.isfinite(p.grad).all()


def test_huge_finite_rows_give_a_tiny_finite_coefficient() -> None:
    p = torch.full((2, 3), 1e30)  # ‖θ‖² overflows float32; hypot does not
    c = allora_coefficients(p, eta=2.0)
    assert torch.isfinite(c).all() and (c > 0).all()
    np.testing.assert_allclose(c.numpy(), 1.0 / (1e30 * math.sqrt(3.0)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_parameters(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter((torch.randn(5, 4, generator=gen) * 3).to(dtype))
    p.grad = torch.ones(5, 4, dtype=dtype)
    ALLoRA([p], eta=2.0).scale_()
    assert p.grad.dtype == dtype
    expected = reference_coefficients(p.detach().double().numpy(), 2.0, "row") * np.ones((5, 4))
    rtol = 1e-12 if dtype == torch.float64 else 1e-2
    np.testing.assert_allclose(p.grad.double().numpy(), expected, rtol=rtol)


def test_non_contiguous_gradient_is_scaled_in_place() -> None:
    p = torch.nn.Parameter(torch.ones(3, 2))
    p.grad = torch.ones(2, 3).T  # a transposed (non-contiguous) gradient
    ALLoRA([p], eta=1.0).scale_()
    torch.testing.assert_close(p.grad, torch.full((3, 2), 1.0 / math.sqrt(3.0)))


def test_attach_scales_before_each_step_until_removed() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=1.0)
    handle = ALLoRA([p], eta=4.0).attach(opt)
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -4.0))  # c = η = 4 at θ = 0
    handle.remove()
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -5.0))


HOSTILE = [
    (dict(eta=0.0), "ALLoRA.eta=0.0"),
    (dict(eta=-1.0), "ALLoRA.eta=-1.0"),
    (dict(eta=float("nan")), "ALLoRA.eta=nan"),
    (dict(eta=float("inf")), "ALLoRA.eta=inf"),
    (dict(eta=True), "ALLoRA.eta=True"),
    (dict(eta="2"), "ALLoRA.eta='2'"),
    (dict(eta=None), "ALLoRA.eta=None"),
    (dict(granularity="column"), "ALLoRA.granularity='column'"),
    (dict(granularity=None), "ALLoRA.granularity=None"),
]


@pytest.mark.parametrize(("kwargs", "message"), HOSTILE)
def test_bad_arguments_raise_one_clear_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match="allowed") as err:
        ALLoRA([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    assert message in str(err.value)


def test_empty_or_non_tensor_params_raise() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        ALLoRA([])
    with pytest.raises(ValueError, match=r"params\[1\] is a float; allowed: tensors"):
        ALLoRA([torch.zeros(2), 1.0])  # type: ignore[list-item]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(eta=st.one_of(st.floats(max_value=0.0), st.just(float("inf")), st.just(float("nan"))))
def test_any_eta_that_is_not_a_finite_positive_number_is_refused(eta: float) -> None:
    with pytest.raises(ValueError, match=r"ALLoRA\.eta=.*allowed: a finite number > 0"):
        ALLoRA([torch.nn.Parameter(torch.zeros(1))], eta=eta)


def test_a_model_without_lora_is_refused_by_for_peft_and_left_alone_by_apply_allora() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="no trainable LoRA parameter in Sequential"):
        ALLoRA.for_peft(model)
    with pytest.warns(NoLoRAFoundWarning):
        assert apply_allora(model) == 0
    assert isinstance(model[1], torch.nn.Dropout)


def test_a_peft_llama_from_config_trains_under_allora_with_scaling_one_and_no_dropout() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    lora = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoLoRAFoundWarning)
        assert apply_allora(model) == 4  # 2 layers × (q_proj, v_proj)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 1.0 and isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert model.peft_config["default"].lora_alpha == 4 and model.peft_config["default"].lora_dropout == 0.0

    allora = ALLoRA.for_peft(model, eta=2.0)
    assert len(allora.params) == 8 and all(p.requires_grad for p in allora.params)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    raw_b = layer.lora_B["default"].weight.grad.clone()
    allora.scale_()
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, 2.0 * raw_b)  # B = 0: c = η

    opt = torch.optim.AdamW(allora.params, lr=1e-2)
    allora.attach(opt)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert layer.lora_B["default"].weight.abs().max() > 0


def test_a_sparse_gradient_or_a_complex_parameter_is_refused_before_any_gradient_is_scaled() -> None:
    """Before: torch's "reshape is not implemented for sparse tensors", and a complex LoRA factor got coefficients
    from its real part alone (a UserWarning from inside, the imaginary part discarded)."""
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    dense = torch.nn.Parameter(torch.ones(3, 2))
    dense.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"ALLoRA: a sparse gradient .* shape \(10, 4\); allowed: dense gradients"):
        ALLoRA([dense, embedding.weight]).scale_()
    assert torch.equal(dense.grad, torch.ones(3, 2))  # nothing scaled
    factor = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    factor.grad = torch.ones(3, 2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"ALLoRA: a torch.complex64 parameter .*; allowed: real floating-point"):
        ALLoRA([factor]).scale_()
