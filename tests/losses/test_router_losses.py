"""keel.losses.router: the router z-loss and the Switch load-balancing loss against float64 hand derivations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.losses import load_balancing_loss, router_z_loss, tokens_per_expert


def _lse(row):
    return math.log(sum(math.exp(v) for v in row))


def test_router_z_loss_value_and_gradient_match_the_hand_derivation_in_float64():
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4, dtype=torch.float64)).requires_grad_()
    loss = router_z_loss(logits, coefficient=1e-3)
    expected = 1e-3 * sum(_lse(row) ** 2 for row in logits.tolist()) / 5
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    lse = torch.logsumexp(logits.detach(), dim=-1, keepdim=True)
    hand = 2 * 1e-3 * lse * logits.detach().softmax(-1) / 5  # d/dx_tj of c·mean_t lse_t² = 2c·lse_t·p_tj / T
    torch.testing.assert_close(logits.grad, hand, rtol=1e-12, atol=0)


def test_router_z_loss_mask_counts_only_selected_tokens_and_empty_is_zero():
    logits = torch.tensor([[0.0, 0.0], [50.0, 0.0]])
    only_first = router_z_loss(logits, coefficient=1.0, mask=torch.tensor([True, False]))
    assert only_first.item() == pytest.approx(math.log(2) ** 2)
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0


def test_load_balancing_loss_is_one_balanced_and_e_over_k_collapsed():
    uniform = torch.zeros(8, 4)
    balanced_top1 = torch.arange(8).remainder(4).unsqueeze(-1)
    assert load_balancing_loss(uniform, balanced_top1, coefficient=1.0).item() == pytest.approx(1.0)
    balanced_top2 = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], dim=-1)
    assert load_balancing_loss(uniform, balanced_top2, coefficient=1.0).item() == pytest.approx(1.0)
    # every token to expert 0 with all probability there: E · 1 · 1 = E/k = 4
    collapsed = torch.tensor([[30.0, 0.0, 0.0, 0.0]]).expand(8, 4)
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), coefficient=1.0).item() == (
        pytest.approx(4.0, rel=1e-6)
    )
    # top-2 collapse onto experts {0, 1}, half the probability each: E · 2 · (1/2 · 1/2) = E/k = 2
    two = torch.tensor([[30.0, 30.0, 0.0, 0.0]]).expand(8, 4)
    pair = torch.tensor([[0, 1]]).expand(8, 2)
    assert load_balancing_loss(two, pair, coefficient=1.0).item() == pytest.approx(2.0, rel=1e-6)


def test_load_balancing_loss_value_and_gradient_match_the_hand_derivation_in_float64():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, dtype=torch.float64).requires_grad_()
    chosen = logits.detach().topk(2, dim=-1).indices
    loss = load_balancing_loss(logits, chosen, coefficient=1e-2)
    probs = logits.detach().softmax(-1)
    f = [sum(row.count(i) for row in chosen.tolist()) / 12 for i in range(4)]
    p_mean = probs.mean(0).tolist()
    assert loss.item() == pytest.approx(1e-2 * 4 * sum(fi * pi for fi, pi in zip(f, p_mean, strict=True)), rel=1e-12)
    loss.backward()
    # d/dx_tj (1/T) Σ_i f_i p_ti = (1/T) p_tj (f_j − Σ_i f_i p_ti); f is a count and carries no gradient
    f_t = torch.tensor(f, dtype=torch.float64)
    hand = 1e-2 * 4 / 6 * probs * (f_t - (probs * f_t).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, hand, rtol=1e-12, atol=1e-18)


@pytest.mark.slow  # importing transformers costs seconds; the hand-derived values above back the same normalisation
def test_load_balancing_loss_is_hugging_face_s_value_divided_by_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(2)
    logits = torch.randn(10, 8)
    for k in (1, 2):
        chosen = logits.topk(k, dim=-1).indices
        ours = load_balancing_loss(logits, chosen, coefficient=1.0)
        theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        assert ours.item() == pytest.approx(theirs.item() / k, rel=1e-5)


def test_tokens_per_expert_ignores_a_dropped_token_sentinel():
    counts = tokens_per_expert(torch.tensor([[0, 4], [1, 0]]), 4)  # 4 = Hugging Face's "no expert"
    assert counts.tolist() == [2.0, 1.0, 0.0, 0.0]


ONE_EACH = torch.zeros(3, 1, dtype=torch.long)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: load_balancing_loss(torch.zeros(3, 4), torch.zeros(3, 1)), "chosen is a torch.float32 tensor"),
        (lambda: load_balancing_loss(torch.zeros(3, 4), [[0], [1], [2]]), "chosen is list"),
        (lambda: load_balancing_loss(torch.zeros(3, 4), torch.zeros(2, 1, dtype=torch.long)), "chosen.shape=(2, 1)"),
        (lambda: load_balancing_loss(torch.zeros(3, 4, dtype=torch.long), ONE_EACH), "logits is a torch.int64"),
        (lambda: load_balancing_loss(torch.zeros(3, 4), ONE_EACH, coefficient=-1.0), "coefficient=-1.0"),
        (lambda: load_balancing_loss(torch.zeros(3, 4), ONE_EACH, coefficient=math.nan), "coefficient=nan"),
        (lambda: router_z_loss(torch.zeros(3, 4), coefficient=math.inf), "coefficient=inf"),
        (lambda: router_z_loss(torch.zeros(3, 4), mask=torch.ones(4, dtype=torch.bool)), "mask.shape=(4,)"),
        (lambda: router_z_loss(torch.zeros(3, 4, dtype=torch.long)), "logits is a torch.int64 tensor"),
    ],
)
def test_router_losses_refuse_bad_arguments_with_one_clear_error(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(2, 6),
    k=st.integers(1, 2),
    scale=st.floats(0.0, 20.0),
    seed=st.integers(0, 2**16),
)
def test_load_balancing_loss_lies_between_zero_and_e_over_k_and_ignores_expert_order(tokens, experts, k, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(tokens, experts, generator=generator, dtype=torch.float64)
    chosen = logits.topk(k, dim=-1).indices
    value = load_balancing_loss(logits, chosen, coefficient=1.0).item()
    assert 0.0 <= value <= experts / k + 1e-9
    perm = torch.randperm(experts, generator=generator)
    inverse = torch.argsort(perm)
    permuted = load_balancing_loss(logits[:, perm], inverse[chosen], coefficient=1.0).item()
    assert permuted == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert router_z_loss(logits, coefficient=1.0).item() >= 0.0


def test_tokens_per_expert_counts_as_bincount_and_compiles_without_a_break() -> None:
    """Boolean indexing and bincount gave two graph breaks per MoE layer under torch.compile (data-dependent
    shapes); the counts are unchanged, dropped-token sentinels (-1, E) still left out."""
    chosen = torch.tensor([[0, 3], [3, 4], [-1, 1], [3, 0]])  # E = 4: 4 and -1 are sentinels
    expected = torch.bincount(torch.tensor([0, 3, 3, 1, 3, 0]), minlength=4).float()
    assert torch.equal(tokens_per_expert(chosen, 4), expected)
    for fn, args in ((tokens_per_expert, (chosen, 4)), (load_balancing_loss, (torch.randn(4, 4), chosen))):
        torch._dynamo.reset()
        assert torch._dynamo.explain(fn)(*args).graph_break_count == 0, fn.__name__
