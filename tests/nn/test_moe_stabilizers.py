"""The MoE stabilizers: router z-loss and load balancing injected Megatron-style, EvoMoE's dense-to-sparse gate and
MomentumSMoE's momentum residual — each against a float64 hand reference, on a 20-line MoE of the tests' own (laid out
like Hugging Face's Mixtral), on keel's proxy MoE and on a tiny Hugging Face Mixtral built from a config."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel.losses import load_balancing_loss, router_z_loss
from keel.nn import (
    DenseToSparseSchedule,
    MomentumState,
    RouterAuxLossHook,
    StabilizerNoEffectWarning,
    create_stabilizer,
    load_stabilized,
    set_router_loss_scale,
    stabilize,
    stabilize_record,
)
from keel.nn.dense_to_sparse_gate import dense_to_sparse_route
from tests.tiny_hf import tiny_mixtral

D, E = 6, 4


class Router(nn.Module):
    """Hugging Face 5.x ``MixtralTopKRouter``: returns (raw logits, renormalised top-k weights, indices)."""

    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(E, D, dtype=torch.float64))

    def forward(self, x):
        logits = F.linear(x.reshape(-1, D), self.weight)
        weights, indices = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), indices


class Block(nn.Module):
    """A sparse MoE block that, like Hugging Face's experts, takes any number of indices per token."""

    def __init__(self, top_k: int = 2) -> None:
        super().__init__()
        self.gate = Router(top_k)
        self.experts = nn.ModuleList(nn.Linear(D, D, dtype=torch.float64) for _ in range(E))

    def forward(self, x):
        _, weights, indices = self.gate(x)
        flat = x.reshape(-1, D)
        out = torch.zeros_like(flat)
        for slot in range(indices.shape[-1]):
            for e, expert in enumerate(self.experts):
                rows = (indices[:, slot] == e).nonzero().squeeze(-1)
                out = out.index_add(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.reshape(x.shape)


class Layer(nn.Module):
    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.mlp = Block(top_k)

    def forward(self, x):
        return x + self.mlp(torch.tanh(x))


class TinyMoE(nn.Module):
    def __init__(self, layers: int = 3, top_k: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(top_k) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _model(seed: int = 0, **kwargs) -> TinyMoE:
    torch.manual_seed(seed)
    return TinyMoE(**kwargs)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _explicit_aux(model: TinyMoE, x: torch.Tensor, kind: str, coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The task loss and Σ_layers coefficient·aux, computed by hand from each router's output (no hooks)."""
    total = torch.zeros((), dtype=torch.float64)
    seen = []
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in model.layers]
    task = model(x).square().mean()
    for handle in handles:
        handle.remove()
    for logits, _, chosen in seen:
        if kind == "router_z_loss":
            total = total + router_z_loss(logits, coefficient=coefficient)
        else:
            total = total + load_balancing_loss(logits, chosen, coefficient=coefficient)
    return task, total


# --- router z-loss and load balancing, injected in backward -----------------------------------------------------------


@pytest.mark.parametrize(("kind", "coefficient"), [("router_z_loss", 1e-3), ("load_balancing", 1e-2)])
def test_injected_router_loss_gives_the_gradient_of_loss_plus_aux_and_leaves_the_loss_untouched(kind, coefficient):
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    reference = _model()
    task, aux = _explicit_aux(reference, x, kind, coefficient)
    (task + aux).backward()
    stabilized = _model()
    result = stabilize(stabilized, [kind])
    assert sorted(result.replaced) == [f"layers.{i}.mlp.gate" for i in range(3)]
    loss = stabilized(x).square().mean()
    assert loss.item() == task.item()  # the user's loss is untouched
    loss.backward()
    expected, got = _grads(reference), _grads(stabilized)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-15, msg=name)
    hooks = [c.extra for c in result.changes]
    assert all(isinstance(h, RouterAuxLossHook) and h.last is not None for h in hooks)
    assert sum(h.last for h in hooks).item() * coefficient == pytest.approx(aux.item(), rel=1e-12)


def test_router_loss_scale_scales_only_the_injected_gradient():
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for scale in (1.0, 0.25):
        model = _model()
        stabilize(model, ["router_z_loss"])
        set_router_loss_scale(model, scale)
        model(x).sum().mul(0.0).backward()  # a task loss with no gradient: only the z-loss's remains
        grads.append(model.layers[0].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-12, atol=0)
    assert grads[0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"scale=0; allowed: a finite number > 0"):
        set_router_loss_scale(model, 0)


def test_router_loss_hooks_record_under_no_grad_inject_nothing_and_are_not_attached_twice():
    model = _model()
    first = stabilize(model, ["router_z_loss", "load_balancing"])
    second = stabilize(model, ["router_z_loss", "load_balancing"])
    assert all("already attached" in c.how for c in second.changes)
    assert sum(len(layer.mlp.gate._forward_hooks) for layer in model.layers) == 6
    with torch.no_grad():
        model(torch.zeros(2, D, dtype=torch.float64))
    assert all(c.extra.last is not None for c in first.changes)
    lb = [c.extra.last.item() for c in first.changes if c.stabilizer == "load_balancing"]
    assert lb[0] == pytest.approx(1.0)  # zero input, uniform P_i = 1/E: E·Σ f_i/E = 1 whatever the routing
    assert all(1.0 <= v <= E / 2 for v in lb)  # two identical tokens: both on the same 2 experts


def test_load_balancing_on_a_logits_only_router_takes_top_k_from_the_block():
    """Mixtral 4.x: ``block_sparse_moe.gate`` is an nn.Linear returning logits; k is the block's ``top_k``."""

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.top_k = 2
            self.gate = nn.Linear(D, E, bias=False, dtype=torch.float64)
            self.experts = nn.ModuleList(nn.Linear(D, D, dtype=torch.float64) for _ in range(E))

        def forward(self, x):
            return self.gate(x).softmax(-1) @ torch.stack([e(x) for e in self.experts], -2)

    torch.manual_seed(0)
    block = Old()
    result = stabilize(block, ["load_balancing"])
    x = torch.randn(4, D, dtype=torch.float64)
    block(x)
    hook = result.changes[0].extra
    logits = block.gate(x)
    assert hook.top_k == 2
    assert hook.last.item() == pytest.approx(
        load_balancing_loss(logits, logits.topk(2, -1).indices, coefficient=1.0).item(), rel=1e-12
    )


def test_moe_stabilizers_on_the_proxy_moe_find_every_router_and_train_through_both_gate_phases():
    from keel.proxy import create_proxy_model
    from keel.proxy.moe import MoeConfig

    torch.manual_seed(0)
    model = create_proxy_model("tiny", moe=MoeConfig(num_experts=4, top_k=2, aux_loss=0.0))
    dts = create_stabilizer("dense_to_sparse", hard_step=1)
    result = stabilize(model, ["router_z_loss", "load_balancing", dts, "momentum_smoe"])
    gates = sorted(n for n, m in model.named_modules() if n.endswith("mlp.gate"))
    assert gates and sorted(result.by_stabilizer()["router_z_loss"]) == gates
    assert sorted(result.by_stabilizer()["momentum_smoe"]) == [g.removesuffix(".gate") for g in gates]
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    counts = []
    for _ in range(2):
        model(tokens).mul(0.0).sum().backward()  # no task gradient: what reaches the routers is the injected losses'
        counts.append(model.blocks[0].mlp.stats.tokens_per_expert.sum().item())
    assert counts == [16 * 4, 16 * 1]  # every token to all 4 experts (dense), then to 1 (hard top-1)
    routers = [m for n, m in model.named_modules() if n in gates]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in routers)


# --- EvoMoE dense-to-sparse gate --------------------------------------------------------------------------------------


def test_dense_to_sparse_temperature_follows_the_official_exp_and_linear_schedules():
    exp = DenseToSparseSchedule(hard_step=10, decay_steps=100, tau_max=1.0, tau_min=0.5)
    for t in (0, 1, 50, 99, 100, 400):
        assert exp.temperature(t) == pytest.approx(max(1.0 * math.exp(t * math.log(0.5 / 1.0) / 100), 0.5))
    assert exp.temperature(50) == pytest.approx(math.sqrt(0.5))  # halfway in log space
    linear = DenseToSparseSchedule(hard_step=10, decay_steps=100, schedule="linear", tau_max=2.0, tau_min=0.5)
    assert [linear.temperature(t) for t in (0, 50, 100, 150)] == pytest.approx([2.0, 1.25, 0.5, 0.5])
    assert not exp.is_hard(9) and exp.is_hard(10)


def test_dense_to_sparse_requires_an_explicit_hard_step_because_the_official_default_is_hard_at_update_0():
    with pytest.raises(ValueError, match=r"hard_step=None; .*official default -1 turns the gate hard at update 0"):
        create_stabilizer("dense_to_sparse")


def test_dense_to_sparse_routes_dense_by_gumbel_gates_then_hard_top1_and_top1_softmax_in_eval():
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(1))
    schedule = DenseToSparseSchedule(hard_step=3, decay_steps=4, threshold=0.05, update=0)
    torch.manual_seed(11)
    weights, chosen = dense_to_sparse_route(logits, schedule, training=True)
    torch.manual_seed(11)
    gates = F.gumbel_softmax(logits.log_softmax(-1), tau=1.0, hard=False)
    torch.testing.assert_close(weights, gates * (gates > 0.05))
    assert chosen.tolist() == [list(range(E))] * 5
    schedule.update = 3
    torch.manual_seed(12)
    weights, chosen = dense_to_sparse_route(logits, schedule, training=True)
    torch.manual_seed(12)
    gates = F.gumbel_softmax(logits.log_softmax(-1), tau=schedule.temperature(3), hard=False)
    assert chosen.shape == (5, 1) and chosen.squeeze(-1).tolist() == gates.argmax(-1).tolist()
    torch.testing.assert_close(weights.squeeze(-1), gates.max(-1).values)
    weights, chosen = dense_to_sparse_route(logits, schedule, training=False)
    assert chosen.squeeze(-1).tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(weights.squeeze(-1), logits.softmax(-1).max(-1).values)


def test_dense_to_sparse_counts_training_forwards_and_switches_hard_at_hard_step():
    model = _model(layers=1)
    result = stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=2)])
    schedule = result.changes[0].extra
    assert all(c.extra is schedule for c in result.changes) and schedule.decay_steps == 2
    x = torch.randn(3, D, dtype=torch.float64)
    widths = []
    hook = model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: widths.append(out[2].shape[-1]))
    for _ in range(3):
        model(x).sum().backward()
    model.eval()
    model(x)
    hook.remove()
    assert schedule.update == 2
    assert widths == [E, E, 1, 1]  # dense at updates 0 and 1, hard from 2, top-1 in eval (not counted)


# --- MomentumSMoE -----------------------------------------------------------------------------------------------------


def test_momentum_smoe_follows_the_heavy_ball_recursion_over_three_moe_layers_in_float64():
    model = _model()
    x0 = torch.randn(2, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    blocks = [layer.mlp for layer in model.layers]
    # hand recursion with the blocks' own forward (no hooks): p ← μp + γ f, x ← x + p, p = 0 at the start
    mu, gamma = 0.7, 1.0
    x, p = x0, torch.zeros_like(x0)
    for block in blocks:
        f = block.forward(torch.tanh(x))
        p = mu * p + gamma * f
        x = x + p
    result = stabilize(model, ["momentum_smoe"])
    assert sorted(result.replaced) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    torch.testing.assert_close(model(x0), x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model(x0), x, rtol=1e-13, atol=1e-13)  # p starts at 0 with every forward
    state = result.changes[0].extra
    assert isinstance(state, MomentumState) and state.p is None  # no graph kept between forwards


def test_momentum_smoe_with_no_momentum_and_unit_step_leaves_the_model_unchanged():
    plain, changed = _model(), _model()
    stabilize(changed, [create_stabilizer("momentum_smoe", momentum=0.0, step_size=1.0)])
    x = torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(changed(x), plain(x), rtol=0, atol=0)


# --- options, records, models without routers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("router_z_loss", {"coefficient": -1.0}, "RouterZLossStabilizer.coefficient=-1.0"),
        ("router_z_loss", {"routers": "layers.0.mlp.gate"}, "RouterZLossStabilizer.routers='layers.0.mlp.gate'"),
        ("load_balancing", {"coefficient": math.nan}, "LoadBalancingStabilizer.coefficient=nan"),
        ("load_balancing", {"top_k": 0}, "LoadBalancingStabilizer.top_k=0"),
        ("dense_to_sparse", {"hard_step": -1}, "DenseToSparseStabilizer.hard_step=-1"),
        ("dense_to_sparse", {"hard_step": 5, "decay_steps": 0}, "DenseToSparseStabilizer.decay_steps=0"),
        ("dense_to_sparse", {"hard_step": 5, "tau_min": 0.0}, "DenseToSparseStabilizer.tau_min=0.0"),
        ("dense_to_sparse", {"hard_step": 5, "tau_max": 0.1}, "DenseToSparseStabilizer.tau_max=0.1"),
        ("dense_to_sparse", {"hard_step": 5, "schedule": "cosine"}, "schedule='cosine'; allowed: exp, linear"),
        ("momentum_smoe", {"momentum": 1.5}, "MomentumSMoEStabilizer.momentum=1.5"),
        ("momentum_smoe", {"step_size": 0.0}, "MomentumSMoEStabilizer.step_size=0.0"),
    ],
)
def test_moe_stabilizers_refuse_bad_options_with_one_clear_error(name, options, message):
    with pytest.raises(ValueError) as info:
        create_stabilizer(name, **options)
    assert message in str(info.value)


def test_named_routers_that_do_not_exist_are_one_clear_error():
    with pytest.raises(ValueError, match=r"router_z_loss.routers=\['nope'\]: 'nope' is not a submodule"):
        stabilize(_model(), [create_stabilizer("router_z_loss", routers=["nope"])])


def test_moe_stabilizers_leave_a_dense_model_alone_and_say_so():
    with pytest.warns(StabilizerNoEffectWarning, match="dense_to_sparse, router_z_loss, load_balancing, momentum_smoe"):
        stabilize(
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
            [create_stabilizer("dense_to_sparse", hard_step=1), "router_z_loss", "load_balancing", "momentum_smoe"],
        )


def test_moe_stabilizers_round_trip_through_the_stabilize_record():
    model = _model()
    stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=7), "router_z_loss", "momentum_smoe"])
    record = stabilize_record(model)
    fresh = _model()
    load_stabilized(fresh, model.state_dict(), record)
    assert stabilize_record(fresh) == record
    assert any(e["stabilizer"] == "dense_to_sparse" and e["hard_step"] == 7 for e in record)


# --- a tiny Hugging Face Mixtral built from a config ------------------------------------------------------------------


def _mixtral():
    pytest.importorskip("transformers")
    return tiny_mixtral()


@pytest.mark.slow  # seconds (transformers); the TinyMoE tests above back the same claims on HF's router layout
def test_on_hf_mixtral_the_injected_losses_match_hf_s_router_logits_and_the_stabilizers_find_mlp_gate():
    model = _mixtral()
    ids = torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    result = stabilize(model, ["router_z_loss", "load_balancing"])
    gates = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert result.by_stabilizer() == {"router_z_loss": gates, "load_balancing": gates}
    out = model(ids, labels=ids, output_router_logits=True)
    hooks = {(c.stabilizer, c.name): c.extra for c in result.changes}
    for layer, logits in enumerate(out.router_logits):
        chosen = logits.topk(2, dim=-1).indices
        z = hooks["router_z_loss", gates[layer]].last
        lb = hooks["load_balancing", gates[layer]].last
        assert z.item() == pytest.approx(router_z_loss(logits, coefficient=1.0).item(), rel=1e-6)
        assert lb.item() == pytest.approx(load_balancing_loss(logits, chosen, coefficient=1.0).item(), rel=1e-6)
    model.zero_grad()
    plain = _mixtral()
    task = plain(ids, labels=ids, output_router_logits=True)
    extra = sum(router_z_loss(lg) + load_balancing_loss(lg, lg.topk(2, -1).indices) for lg in task.router_logits)
    (task.loss - 1e-3 * task.aux_loss + extra).backward()  # HF adds router_aux_loss_coef·aux itself: take it out
    stabilized_loss = model(ids, labels=ids).loss  # output_router_logits off: HF adds no aux loss of its own
    assert stabilized_loss.item() == pytest.approx(task.loss.item() - 1e-3 * task.aux_loss.item(), rel=1e-6)
    stabilized_loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_on_hf_mixtral_dense_to_sparse_and_momentum_smoe_train_through_both_phases():
    model = _mixtral()
    result = stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=1), "momentum_smoe"])
    assert result.by_stabilizer() == {
        "dense_to_sparse": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
        "momentum_smoe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    }
    ids = torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    widths = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: widths.append(out[2].shape[-1]))
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert math.isfinite(loss.item())
        assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert widths == [4, 1]  # dense over the 4 experts at update 0, hard top-1 from update 1


def test_dense_to_sparse_schedule_follows_optimizer_steps_under_gradient_accumulation():
    model = _model(layers=1)
    schedule = stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=1)]).changes[0].extra
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule.follow(optimizer)
    widths = []
    model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: widths.append(out[2].shape[-1]))
    x = torch.randn(3, D, dtype=torch.float64)
    for _ in range(2):
        for _ in range(2):  # two micro-batches per update
            model(x).sum().backward()
        optimizer.step()
    assert schedule.update == 2
    assert widths == [E, E, 1, 1]  # both micro-batches of update 0 dense, both of update 1 hard


def test_dense_to_sparse_runs_before_router_hooks_attached_earlier_so_they_see_the_routing_used():
    model = _model(layers=1)
    balancing = stabilize(model, ["load_balancing"]).changes[0].extra
    stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=5)])
    x = torch.randn(4, D, dtype=torch.float64)
    model(x).sum().backward()
    # dense phase: every token on all E experts, f_i = 1/E, so E·Σ f_i·P_i = Σ P_i = 1 (the original top-2 would not be)
    assert balancing.last.item() == pytest.approx(1.0, abs=1e-12)


def test_a_router_output_the_hook_cannot_read_warns_once_and_training_goes_on_unchanged():
    from keel.nn.router_aux_loss import RouterHookWarning

    class Odd(nn.Module):
        def forward(self, x):
            return {"logits": x}

    odd = Odd()
    RouterAuxLossHook("router_z_loss", 1e-3).attach(odd)
    x = torch.randn(2, 4)
    with pytest.warns(RouterHookWarning, match="router_z_loss on Odd: router output dict; allowed"):
        assert odd(x)["logits"] is x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odd(x)  # once
