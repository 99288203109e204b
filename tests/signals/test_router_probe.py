"""The router probe: every statistic against a float64 hand computation, edge values (NaN, Inf, bf16, no tokens),
router discovery (HF Mixtral 5.x TopKRouter, a 4.x-style nn.Linear gate, Qwen2-MoE's shared_expert_gate skipped,
named modules), micro-batches adding up, eval forwards ignored, a model with no router left alone, and a tiny HF
Mixtral built from a config trained under Guard (its aux loss ÷ k equal to the probe's)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel.guard import Guard
from keel.signals import RouterProbe, RouterProbeConfig, find_routers, router_signals, router_sums
from tests.signals.contexts import step_context
from tests.tiny_hf import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# fixed logits: 6 tokens × 4 experts; expert 3 never in anyone's top 2
LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.5, -1.0],
        [0.1, 3.0, 0.2, -2.0],
        [1.5, 1.4, -0.3, -0.5],
        [-1.0, 0.0, 2.5, -3.0],
        [0.0, 0.3, 1.0, -1.0],
        [4.0, -4.0, 3.0, -0.5],
    ],
    dtype=torch.float64,
)


def _reference(logits: torch.Tensor, k: int, capacity_factor: float | None = None) -> dict[str, float]:
    """Every statistic in float64, token by token, in plain Python arithmetic over the rows."""
    rows = logits.tolist()
    n, e = len(rows), len(rows[0])
    counts, prob_sum, z, h = [0.0] * e, [0.0] * e, 0.0, 0.0
    for row in rows:
        lse = math.log(sum(math.exp(v) for v in row))
        z += lse**2
        p = [math.exp(v - lse) for v in row]
        h += -sum(q * math.log(q) for q in p if q > 0) / math.log(e)
        for i in sorted(range(e), key=lambda i: -row[i])[:k]:
            counts[i] += 1
        prob_sum = [a + b for a, b in zip(prob_sum, p, strict=True)]
    mean = n * k / e
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / e)
    dropped = 0.0
    if capacity_factor is not None:
        cap = math.ceil(n * k / e * capacity_factor)
        dropped = sum(max(c - cap, 0) for c in counts) / (n * k)
    return {
        "max_logit": max(max(r) for r in rows),
        "z": z / n,
        "entropy": h / n,
        "imbalance": max(counts) / mean,
        "cv": std / mean,
        "dead": float(sum(c == 0 for c in counts)),
        "dropped": dropped,
        "aux": e * sum(c / (n * k) * (s / n) for c, s in zip(counts, prob_sum, strict=True)),
        "experts": float(e),
        "top_k": float(k),
    }


def _signals(logits: torch.Tensor, chosen=None, **kw) -> dict[str, float]:
    return {k: v.item() for k, v in router_signals(*router_sums(logits, chosen, **kw)).items()}


@pytest.mark.parametrize("k", [1, 2])
def test_every_statistic_matches_a_float64_hand_computation(k):
    ref = _reference(LOGITS, k)
    got = _signals(LOGITS.float(), top_k=k)
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    if k == 2:
        assert got["dead"] == 1.0  # expert 3 is never chosen


def test_dropped_fraction_is_the_excess_over_capacity():
    # k=1: counts [2, 1, 2, 1]... capacity ceil(6/4 · 1.0) = 2 → nothing dropped; factor 0.5 → capacity 1
    assert _signals(LOGITS, top_k=1, capacity_factor=1.0)["dropped"] == pytest.approx(
        _reference(LOGITS, 1, 1.0)["dropped"]
    )
    got = _signals(LOGITS, top_k=1, capacity_factor=0.5)["dropped"]
    assert got == pytest.approx(_reference(LOGITS, 1, 0.5)["dropped"]) and got > 0


def test_chosen_experts_from_the_router_output_are_used_not_recomputed():
    chosen = torch.zeros(6, 1, dtype=torch.long)  # a router that sends every token to expert 0 whatever its logits
    got = _signals(LOGITS, chosen)
    assert got["imbalance"] == pytest.approx(4.0) and got["dead"] == 3.0  # E/k: collapsed
    assert got["aux"] == pytest.approx(4 * torch.softmax(LOGITS, -1)[:, 0].mean().item(), rel=1e-6)


def test_uniform_router_is_balanced_one_and_collapsed_router_gives_e_over_k():
    uniform = _signals(torch.zeros(8, 4), torch.arange(8).reshape(4, 2) % 4)
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["aux"] == pytest.approx(1.0)
    assert uniform["imbalance"] == pytest.approx(1.0) and uniform["cv"] == 0 and uniform["dead"] == 0
    spike = torch.full((8, 4), -30.0)
    spike[:, :2] = 30.0
    collapsed = _signals(spike, top_k=2)
    assert collapsed["imbalance"] == pytest.approx(2.0) and collapsed["dead"] == 2.0  # E/k = 4/2
    assert collapsed["aux"] == pytest.approx(2.0, rel=1e-5) and collapsed["entropy"] == pytest.approx(0.5, abs=1e-6)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 12),
    e=st.integers(2, 8),
    k=st.integers(1, 3),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_signals_stay_in_their_ranges(t, e, k, scale, seed):
    k = min(k, e)
    logits = scale * torch.randn(t, e, generator=torch.Generator().manual_seed(seed))
    got = _signals(logits, top_k=k)
    assert 1.0 - 1e-5 <= got["imbalance"] <= e / k + 1e-5
    assert -1e-6 <= got["entropy"] <= 1.0 + 1e-5
    assert got["cv"] >= 0 and 0 <= got["dead"] <= e - k and got["dropped"] == 0
    assert got["z"] >= 0 and got["aux"] >= 0
    assert got["max_logit"] == pytest.approx(logits.max().item())


def test_nan_and_inf_logits_show_as_non_finite_never_as_a_healthy_value():
    nan = LOGITS.float().clone()
    nan[2, 1] = float("nan")
    got = _signals(nan, top_k=2)
    assert math.isnan(got["max_logit"]) and math.isnan(got["z"]) and math.isnan(got["entropy"])
    inf = LOGITS.float().clone()
    inf[0, 0] = float("inf")
    got = _signals(inf, top_k=2)
    assert got["max_logit"] == math.inf and got["z"] == math.inf


def test_bf16_logits_are_measured_in_float32():
    bf16 = LOGITS.to(torch.bfloat16)
    sums, counts, probs = router_sums(bf16, top_k=2)
    assert sums.dtype == counts.dtype == probs.dtype == torch.float32
    ref = _reference(bf16.double(), 2)
    got = _signals(bf16, top_k=2)
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_no_tokens_gives_nan_ratios_not_a_balanced_router():
    got = _signals(torch.zeros(0, 4), top_k=2)
    assert math.isnan(got["imbalance"]) and math.isnan(got["aux"]) and math.isnan(got["entropy"])


# --- discovery ------------------------------------------------------------------------------------------------------
class LinearGateMoe(nn.Module):
    """Mixtral 4.x's layout: ``block_sparse_moe.gate`` is an nn.Linear(d, E) returning the logits only."""

    def __init__(self, d: int = 8, e: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        w, idx = torch.softmax(logits, -1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for j in range(self.top_k):
            for i, expert in enumerate(self.experts):
                mask = (idx[..., j] == i).unsqueeze(-1)
                out = out + mask * w[..., j : j + 1] * expert(x)
        return out


class SharedExpertMoe(LinearGateMoe):
    """Qwen2-MoE's extra ``shared_expert_gate`` (nn.Linear(d, 1)): a scalar gate, not a router."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_expert_gate = nn.Linear(8, 1, bias=False)


class ClassifierRouter(nn.Module):
    """Switch / NLLB-MoE's router: no weight of its own, a ``classifier`` nn.Linear(d, E) makes the logits."""

    def __init__(self, d: int = 8, e: int = 4) -> None:
        super().__init__()
        self.classifier = nn.Linear(d, e, bias=False)


def _classifier_block(router_name: str, router: nn.Module, experts: bool = True) -> nn.Module:
    block = nn.Module()
    block.add_module(router_name, router)
    if experts:
        block.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    return block


class SwitchTransformersTop1Router(ClassifierRouter):
    pass


class NllbMoeTop2Router(ClassifierRouter):
    pass


class DeclaredTopKRouter(ClassifierRouter):
    top_k = 3


def _with_weight(router: nn.Module) -> nn.Module:
    router.weight = nn.Parameter(torch.zeros(4, 8))
    return router


def _one_expert(router: nn.Module) -> nn.Module:
    router.classifier = nn.Linear(8, 1)
    return router


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (_classifier_block("router", SwitchTransformersTop1Router()), [("router.classifier", 1)]),
        (_classifier_block("router", NllbMoeTop2Router()), [("router.classifier", 2)]),
        (_classifier_block("gate", DeclaredTopKRouter()), [("gate.classifier", 3)]),  # declared beats the class name
        (_classifier_block("router", ClassifierRouter()), [("router.classifier", None)]),  # k unknown: warned
        (_classifier_block("router", SwitchTransformersTop1Router(), experts=False), []),  # no experts beside it
        (_classifier_block("dispatcher", SwitchTransformersTop1Router()), []),  # not named gate / router
        (_classifier_block("router", _with_weight(ClassifierRouter())), [("router", None)]),  # found by its weight
        (_classifier_block("router", _one_expert(ClassifierRouter())), []),  # E = 1: a scalar gate
    ],
)
def test_classifier_routers_are_found_only_in_the_switch_layout(block, expected):
    assert [(s.name, s.top_k) for s in find_routers(block)] == expected


class Net(nn.Module):
    def __init__(self, block: type[nn.Module] = LinearGateMoe) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(), nn.Sequential()])
        self.layers[0].add_module("block_sparse_moe", block())
        self.layers[1].add_module("block_sparse_moe", block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_linear_gate_beside_experts_is_found_and_its_top_k_read_from_the_block():
    sites = find_routers(Net())
    assert [s.name for s in sites] == ["layers.0.block_sparse_moe.gate", "layers.1.block_sparse_moe.gate"]
    assert {s.top_k for s in sites} == {2}


def test_shared_expert_gate_is_not_a_router():
    assert [s.name for s in find_routers(Net(SharedExpertMoe))] == [
        "layers.0.block_sparse_moe.gate",
        "layers.1.block_sparse_moe.gate",
    ]


def test_named_module_is_watched_and_unknown_top_k_warns():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.warns(UserWarning, match="top_k"):
        probe = RouterProbe(modules=["0"])
        probe.attach(model)
    model(torch.randn(5, 8))
    got = probe.read()
    assert got[keys.MOE_LOAD_IMBALANCE_PER_LAYER].names == ("0",)
    with pytest.raises(ValueError, match="nope"):
        RouterProbe(modules=["nope"]).attach(model)


def test_a_model_without_a_router_gets_no_hook_and_emits_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    probe = RouterProbe()
    probe.attach(model)
    assert probe.sites == [] and all(not m._forward_hooks for m in model.modules())
    model(torch.randn(3, 8)).sum().backward()
    assert probe.measure(step_context(model, torch.optim.SGD(model.parameters(), lr=0.1))) == {}


def test_micro_batches_of_one_step_add_up_and_eval_forwards_do_not_count():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 8)
    probe = RouterProbe()
    probe.attach(model)
    model(x)
    whole = probe.read()
    model(x[:1])
    model(x[1:])
    model.eval()
    model(torch.randn(4, 6, 8) * 100)  # an evaluation forward: not a training step's routing
    model.train()
    halves = probe.read()
    for key, value in whole.items():
        a, b = (value.values, halves[key].values) if hasattr(value, "names") else (value, halves[key])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"every": 0}, "every"), ({"top_k": 0}, "top_k"), ({"every": 1.5}, "every"), ({"modules": "gate"}, "modules")],
)
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        RouterProbeConfig(**fields)


# --- a Hugging Face Mixtral built from a config, trained under Guard --------------------------------------------------
def _mixtral(layers: int = 2):
    pytest.importorskip("transformers")
    return tiny_mixtral(layers)


class Capture:
    name = "capture"

    def __init__(self) -> None:
        self.seen: list = []

    def update(self, obs):
        self.seen.append(obs)
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_hf_mixtral_under_guard_matches_its_router_logits_and_aux_loss_over_k():
    model = _mixtral()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    capture = Capture()
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    mod = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    expected = []
    with Guard(model, opt, probes=["loss", "router"], detectors=[capture], log_every=1) as guard:
        for _ in range(2):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
            logits = [r.detach() for r in out.router_logits]
            expected.append(
                {
                    "aux": sum(mod.load_balancing_loss_func((r,), 4, 2).item() / 2 for r in logits) / len(logits),
                    "max": max(r.max().item() for r in logits),
                    "z": max(torch.logsumexp(r.double(), -1).square().mean().item() for r in logits),
                }
            )
            out.loss.backward()
            guard.step(out.loss)
            opt.zero_grad()
    assert [f for f in guard.findings if f.kind == "keel_error"] == []
    assert len(capture.seen) == 2
    for obs, ref in zip(capture.seen, expected, strict=True):
        assert obs.values[keys.MOE_AUX_LOSS] == pytest.approx(ref["aux"], rel=1e-5)
        assert obs.values[keys.MOE_ROUTER_MAX_LOGIT] == pytest.approx(ref["max"], rel=1e-5)
        assert obs.values[keys.MOE_ROUTER_Z] == pytest.approx(ref["z"], rel=1e-5)
        names, _ = obs.per_param[keys.MOE_DEAD_EXPERTS_PER_LAYER]
        assert tuple(names) == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
        assert obs.values[keys.MOE_DROPPED] == 0.0  # HF MoE is dropless
        assert (obs.values[keys.MOE_EXPERTS], obs.values[keys.MOE_TOP_K]) == (4.0, 2.0)  # a collapse's E/k = 2


# --- keel's proxy MoE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_proxy_moe_router_agrees_with_the_blocks_own_routing_stats(capacity_factor):
    from keel.proxy import MoeConfig, MoeMLP, create_proxy_model

    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16, moe=MoeConfig(top_k=2, capacity_factor=capacity_factor))
    probe = RouterProbe()
    probe.attach(model)
    assert [s.name for s in probe.sites] == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)))
    got = probe.read()
    stats = [m.stats for m in model.modules() if isinstance(m, MoeMLP)]
    counts = torch.stack([s.tokens_per_expert for s in stats])
    torch.testing.assert_close(got[keys.MOE_DROPPED_PER_LAYER].values, torch.stack([s.dropped for s in stats]))
    torch.testing.assert_close(got[keys.MOE_ROUTER_Z_PER_LAYER].values, torch.stack([s.router_z for s in stats]))
    torch.testing.assert_close(got[keys.MOE_AUX_LOSS], torch.stack([s.aux_loss for s in stats]).mean())
    torch.testing.assert_close(got[keys.MOE_LOAD_IMBALANCE_PER_LAYER].values, counts.amax(1) / counts.mean(1))
    if capacity_factor is not None:
        assert got[keys.MOE_DROPPED] > 0


class DictRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.lin(x)}


def test_a_named_module_that_returns_no_logits_is_a_keel_error_and_training_goes_on():
    model = nn.Sequential(DictRouter())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, probes=["loss", RouterProbe(modules=["0"], top_k=1)]) as guard:
        for _ in range(2):
            loss = model(torch.randn(3, 8))["logits"].square().mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    errors = [f for f in guard.findings if f.kind == "keel_error"]
    assert errors and "router output dict" in str(errors[0])  # named; no exception reached the loop


@pytest.mark.slow
def test_under_torch_compile_fullgraph_the_values_equal_eager():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 6, 8)
    probe = RouterProbe()
    probe.attach(model)
    model(x)
    eager = probe.read()
    compiled = torch.compile(model, fullgraph=True)  # a hook that broke the graph would raise here
    compiled(x[:1])
    compiled(x[1:])
    got = probe.read()
    for key, value in eager.items():
        a, b = (value.values, got[key].values) if hasattr(value, "names") else (value, got[key])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class SoftmaxRouter(nn.Module):
    """A router whose first output is probabilities, not logits (huggingface/transformers#45120's families)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> tuple:
        probs = torch.softmax(x @ self.weight.t(), -1)
        return probs, probs, probs.topk(2, -1).indices


def test_a_router_that_returns_probabilities_warns_once_and_raw_logits_do_not():
    model = nn.Sequential(SoftmaxRouter())
    probe = RouterProbe(modules=["0"], top_k=2)
    probe.attach(model)
    with pytest.warns(UserWarning, match="probabilities"):
        model(torch.randn(5, 8))
        probe.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(5, 8))
        probe.read()  # checked once: no second host read, no second warning
        raw = RouterProbe(modules=["0"], top_k=2)
        raw.attach(nn.Sequential(nn.Linear(8, 4)))
        raw.sites[0].module(torch.randn(5, 8))
        raw.read()


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(2, 6), st.integers(1, 3)), min_size=1, max_size=4),
    st.integers(0, 2**16),
)
def test_routers_read_together_equal_each_read_alone_property(routers, seed):
    # any number of routers (tokens 0..9: 0 gives the NaN ratios), any E, any k: one pass == one pass per router
    from keel.signals.router import RouterSite, _signals_by_router

    gen = torch.Generator().manual_seed(seed)
    sites = []
    for i, (tokens, experts, k) in enumerate(routers):
        site = RouterSite(name=str(i), module=nn.Identity(), block=None, top_k=k)
        site.sums, site.counts, site.probs = router_sums(torch.randn(tokens, experts, generator=gen), top_k=k)
        sites.append(site)
    together = _signals_by_router(sites)
    for signal, values in together.items():
        alone = torch.stack([router_signals(s.sums, s.counts, s.probs)[signal] for s in sites])
        torch.testing.assert_close(values, alone, equal_nan=True, rtol=0, atol=0)


def test_routers_read_together_equal_each_read_alone_also_with_different_expert_counts():
    from keel.signals.router import RouterSite, _signals_by_router

    gen = torch.Generator().manual_seed(0)
    sites = []
    for i, experts in enumerate((4, 4, 8)):
        site = RouterSite(name=str(i), module=nn.Identity(), block=None, top_k=2)
        site.sums, site.counts, site.probs = router_sums(torch.randn(32, experts, generator=gen), top_k=2)
        sites.append(site)
    for group in (sites[:2], sites):  # one stacked pass (same E), and the per-router fallback (E = 4 and 8)
        together = _signals_by_router(group)
        alone = [router_signals(s.sums, s.counts, s.probs) for s in group]
        for signal, values in together.items():
            assert torch.equal(values, torch.stack([a[signal] for a in alone])), signal
