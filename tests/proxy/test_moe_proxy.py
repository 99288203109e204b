"""The proxy's MoE: shapes, top-k routing, capacity drops, the Switch aux loss and router z-loss by hand, training.

Every test runs on one intra-op thread (`one_torch_thread`): the tiny MoE's per-expert loop only contends on two.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel.proxy import MoeConfig, MoeMLP, MoeRouter, ProxyBatches, create_proxy_model, moe_loss
from keel.proxy.sweep.recipes import RECIPES
from keel.proxy.trainer import TrainConfig, build_model, train_proxy
from keel.signals.router import RouterProbe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _moe(d: int = 4, **config: object) -> MoeMLP:
    torch.manual_seed(0)
    return MoeMLP(d, MoeConfig(**config), expert=lambda: nn.Linear(d, d, bias=False))  # type: ignore[arg-type]


def _route_to(moe: MoeMLP, experts: list[int]) -> torch.Tensor:
    """Tokens whose router logits are 10 on their expert and 0 elsewhere: the router is the identity on e_i."""
    with torch.no_grad():
        moe.gate.weight.copy_(10 * torch.eye(moe.config.num_experts, moe.gate.weight.shape[1]))
    return torch.eye(moe.config.num_experts, moe.gate.weight.shape[1])[experts]


def test_moe_proxy_layout_mirrors_hf_mixtral_gate_and_keeps_shapes() -> None:
    model = create_proxy_model("tiny", moe=MoeConfig(num_experts=4, top_k=2))
    gates = {n: m for n, m in model.named_modules() if isinstance(m, MoeRouter)}
    assert list(gates) == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    assert gates["blocks.0.mlp.gate"].weight.shape == (4, 64)  # (E, d), like HF's router weight
    assert model(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 256)
    logits, weights, indices = gates["blocks.0.mlp.gate"](torch.randn(5, 64, dtype=torch.float64))
    assert logits.dtype == torch.float32 and logits.shape == (5, 4)  # the router runs in fp32
    assert weights.shape == indices.shape == (5, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    assert create_proxy_model("tiny").blocks[0].mlp.__class__.__name__ == "MLP"  # dense stays dense


def test_router_top1_weight_is_the_probability_so_the_router_keeps_a_gradient() -> None:
    router = MoeRouter(3, num_experts=4, top_k=1)
    x = torch.randn(6, 3)
    logits, weights, indices = router(x)
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights.squeeze(-1), probs.max(-1).values)
    assert torch.equal(indices.squeeze(-1), probs.argmax(-1))
    weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_moe_output_is_the_weighted_sum_of_the_chosen_experts() -> None:
    moe = _moe(num_experts=4, top_k=2)
    x = torch.randn(7, 4)
    _, weights, indices = moe.gate(x)
    expected = torch.stack(
        [sum(w * moe.experts[int(e)](x[t]) for w, e in zip(weights[t], indices[t], strict=True)) for t in range(7)]
    )
    torch.testing.assert_close(moe(x), expected)
    assert moe.stats is not None and moe.stats.tokens_per_expert.sum().item() == 14
    assert moe.stats.dropped.item() == 0  # dropless


def test_capacity_drops_the_assignments_past_ceil_t_k_over_e_times_cf_in_token_order() -> None:
    moe = _moe(num_experts=4, top_k=1, capacity_factor=1.0)
    x = _route_to(moe, [0, 0, 0, 0, 1, 2, 3, 0])  # 8 tokens, k=1, E=4: capacity ceil(8/4 · 1) = 2
    assert moe.capacity(8) == 2
    out = moe(x)
    assert moe.stats is not None
    assert moe.stats.tokens_per_expert.tolist() == [5, 1, 1, 1]  # counted before the drop
    assert moe.stats.dropped.item() == pytest.approx(3 / 8)  # expert 0 keeps its first two tokens
    assert out[2:4].abs().sum() == 0 and out[7].abs().sum() == 0  # dropped tokens get nothing from the FFN
    assert out[:2].abs().sum(-1).min() > 0


def test_top2_first_choices_queue_before_second_choices() -> None:
    moe = _moe(num_experts=4, top_k=2, capacity_factor=0.5)
    # 4 tokens, k=2, E=4: capacity ceil(4·2/4·0.5) = 1. Token 0's 2nd choice and token 1's 1st choice are expert 1.
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[5.0, 4, 0, 0], [0, 5, 0, 0], [0, 0, 5, 4], [0, 0, 0, 5]])
    moe(x)
    _, _, indices = moe.gate(x)
    assert indices[:, 0].tolist() == [0, 1, 2, 3]
    # every expert's single slot goes to its first-choice token; all four second choices are dropped
    assert moe.stats is not None and moe.stats.dropped.item() == pytest.approx(4 / 8)


def _aux_float64(logits: torch.Tensor, k: int) -> float:
    """E · Σ f_i P_i by hand in float64 from top-k counts: f_i = count_i / (T·k)."""
    p = logits.double().softmax(-1)
    t, e = p.shape
    chosen = p.topk(k, dim=-1).indices
    f = [sum(int(i in row) for row in chosen.tolist()) / (t * k) for i in range(e)]
    return e * sum(f[i] * p[:, i].mean().item() for i in range(e))


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_1_at_perfect_balance_and_e_over_k_when_collapsed(k: int) -> None:
    moe = _moe(num_experts=4, top_k=k)
    with torch.no_grad():
        moe.gate.weight.copy_(100 * torch.eye(4))  # logits 100 on the token's own experts: a one-hot router
    eye = torch.eye(4)
    balanced = eye if k == 1 else eye + eye.roll(1, dims=0)  # every expert chosen by k of the 4 tokens
    moe(balanced)
    assert moe.stats is not None and moe.stats.aux_loss.item() == pytest.approx(1.0)
    assert moe.stats.tokens_per_expert.tolist() == [k] * 4
    collapsed = eye[[0] * 8] if k == 1 else (eye[0] + eye[1]).expand(8, 4)  # every token to the same k experts
    moe(collapsed)
    assert moe.stats.aux_loss.item() == pytest.approx(4 / k)
    assert moe.stats.aux_loss.item() == pytest.approx(_aux_float64(collapsed @ moe.gate.weight.T.detach(), k))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(k=st.sampled_from([1, 2]), seed=st.integers(0, 10_000), scale=st.floats(0.01, 20))
def test_moe_aux_loss_and_router_z_match_a_float64_hand_computation(k: int, seed: int, scale: float) -> None:
    moe = _moe(d=4, num_experts=4, top_k=k)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(seed)) * scale
    moe(x)
    logits = torch.nn.functional.linear(x.double(), moe.gate.weight.double())
    assert moe.stats is not None
    assert moe.stats.aux_loss.item() == pytest.approx(_aux_float64(logits, k), rel=1e-4, abs=1e-5)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 9
    assert moe.stats.router_z.item() == pytest.approx(z, rel=1e-4, abs=1e-5)


def test_moe_loss_adds_the_weighted_aux_and_z_terms_of_every_layer() -> None:
    model = create_proxy_model("tiny", moe=MoeConfig(aux_loss=1e-2, router_z_loss=1e-3))
    model(torch.zeros(2, 8, dtype=torch.long))
    layers = [b.mlp for b in model.blocks]
    expected = sum(1e-2 * m.stats.aux_loss + 1e-3 * m.stats.router_z for m in layers)
    total = moe_loss(model)
    assert total is not None and total.requires_grad
    torch.testing.assert_close(total.detach(), expected)
    off = create_proxy_model("tiny", moe=MoeConfig(aux_loss=0.0))
    off(torch.zeros(2, 8, dtype=torch.long))
    assert moe_loss(off) is None and moe_loss(create_proxy_model("tiny")) is None


def test_empty_batch_routes_nothing_and_losses_are_zero() -> None:
    moe = _moe(num_experts=4, top_k=2, capacity_factor=1.0)
    assert moe(torch.zeros(0, 4)).shape == (0, 4)
    assert moe.stats is not None and moe.stats.aux_loss.item() == 0 and moe.stats.router_z.item() == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 3),
        ("top_k", 0),
        ("num_experts", 1),
        ("num_experts", 2.5),
        ("capacity_factor", 0.0),
        ("capacity_factor", math.inf),
        ("aux_loss", -1e-2),
        ("router_z_loss", math.nan),
        ("aux_loss", "0.01"),
    ],
)
def test_moe_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"MoeConfig.{field}="):
        MoeConfig(**{field: value})  # type: ignore[arg-type]


def test_proxy_and_train_configs_refuse_a_dict_for_moe() -> None:
    with pytest.raises(ValueError, match="ProxyConfig.moe="):
        create_proxy_model("tiny", moe={"top_k": 1})
    with pytest.raises(ValueError, match="TrainConfig.moe="):
        TrainConfig(moe={"top_k": 1})  # type: ignore[arg-type]


def test_moe_describes_itself_and_a_dense_config_describes_itself_as_before() -> None:
    assert "moe" not in TrainConfig(size="tiny").describe()
    described = TrainConfig(size="tiny", moe=MoeConfig(top_k=1, router_z_loss=1e-3)).describe()["moe"]
    assert described == {
        "num_experts": 4,
        "top_k": 1,
        "capacity_factor": None,
        "aux_loss": 1e-2,
        "router_z_loss": 1e-3,
    }


def test_the_training_loss_holds_the_router_terms() -> None:
    config = TrainConfig(
        size="tiny", steps=1, batch_size=4, seq_len=16, eval_batches=1, moe=MoeConfig(router_z_loss=1e-3)
    )
    start = build_model(config)
    x, y = ProxyBatches(batch_size=4, seq_len=16, seed=config.seed).next()
    cross_entropy = torch.nn.functional.cross_entropy(start(x).flatten(0, 1), y.flatten())
    router_terms = moe_loss(start)
    assert router_terms is not None and router_terms.item() > 1e-3 * 1.9  # z alone is ~(log 4)²
    assert train_proxy(config).losses[0] == pytest.approx((cross_entropy + router_terms).item(), rel=1e-6)


@pytest.mark.slow
def test_moe_proxy_trains_on_cpu_and_its_routers_learn() -> None:
    config = TrainConfig(size="tiny", steps=12, batch_size=8, seq_len=32, eval_batches=1, moe=MoeConfig(top_k=1))
    router_before = build_model(config).blocks[0].mlp.gate.weight.detach().clone()
    run = train_proxy(config)
    assert all(math.isfinite(v) for v in run.losses)
    assert run.losses[-1] < run.losses[0] - 0.5
    assert run.model is not None
    assert not torch.equal(run.model.blocks[0].mlp.gate.weight, router_before)


def test_router_probe_finds_the_proxy_gates_and_agrees_with_the_proxy_stats() -> None:
    model = create_proxy_model("tiny", moe=MoeConfig(top_k=1, capacity_factor=1.0))
    probe = RouterProbe()
    probe.attach(model)
    assert [s.name for s in probe.sites] == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    assert [s.top_k for s in probe.sites] == [1, 1]
    model(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)))
    out = probe.read()
    layers = [b.mlp for b in model.blocks]
    assert out[keys.MOE_DROPPED] > 0  # capacity 1.0 on an untrained router drops some: read from the block
    torch.testing.assert_close(out[keys.MOE_DROPPED], max(m.stats.dropped for m in layers))
    torch.testing.assert_close(out[keys.MOE_AUX_LOSS], sum(m.stats.aux_loss for m in layers) / 2)
    torch.testing.assert_close(out[keys.MOE_ROUTER_Z], max(m.stats.router_z for m in layers))


def test_moe_recipes_add_moe_and_the_router_z_loss_keeping_the_base_moe_settings() -> None:
    assert RECIPES.get("moe_baseline")(TrainConfig(size="tiny")).moe == MoeConfig()
    zloss = RECIPES.get("moe_zloss")(TrainConfig(size="tiny", moe=MoeConfig(top_k=1)))
    assert zloss.moe == MoeConfig(top_k=1, router_z_loss=1e-3)
    own = MoeConfig(num_experts=8, capacity_factor=1.25)
    assert RECIPES.get("moe_baseline")(TrainConfig(moe=own)).moe is own


def test_moe_momentum_and_evomoe_recipes_apply_helper_ws_stabilizers_to_the_proxy() -> None:
    momentum = RECIPES.get("moe_momentum")(TrainConfig(size="tiny"))
    assert momentum.moe == MoeConfig() and momentum.stabilize == ("momentum_smoe",)
    evomoe = RECIPES.get("moe_evomoe")(TrainConfig(size="tiny"))
    assert evomoe.moe == MoeConfig() and evomoe.describe()["model_fn"] == "keel.proxy.sweep.recipes.evomoe_gate"
    model = build_model(evomoe)
    hooked = [type(h).__name__ for b in model.blocks for h in b.mlp.gate._forward_hooks.values()]
    assert hooked == ["DenseToSparseHook", "DenseToSparseHook"]
