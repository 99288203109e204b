"""keel.Guard around a ``torch.compile``d model (docs/compile.md).

It trains, skips a NaN step, stays bit-identical to the bare compiled run under ``observe``, and keel adds no
graph break and no recompilation per micro-batch to the user's forward. What each probe sees under compile is
asserted exactly here and tabled in docs/compile.md.

Most tests compile with a counting backend that runs each captured graph as ``backend="eager"`` does (fast, no
C++ compiler); `test_inductor_end_to_end` uses the real default backend.
"""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import keel
from keel.proxy import create_proxy_model
from keel.signals import OutputLogitsProbe, create_probe
from keel.store import RunReader
from tests.signals.attention_models import CausalSelfAttention, FlashSelfAttention, TwoLayer

SEQ = 16
NAN = float("nan")


class GraphCounter:
    """A dynamo backend that runs each captured graph eagerly (as ``backend="eager"``) and counts graphs.

    Attributes:
        compiled: Graphs captured so far (every graph break and every recompilation adds one).
        runs: Graphs run so far; the graphs one forward runs is the difference around it.
    """

    def __init__(self) -> None:
        self.compiled = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1

        def run(*args: object) -> object:
            self.runs += 1
            return gm.forward(*args)

        return run


class MhaBlock(nn.Module):
    """Causal self-attention through ``nn.MultiheadAttention``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def _proxy() -> nn.Module:
    torch.manual_seed(0)
    return create_proxy_model("tiny", seq_len=SEQ)


def _two_layer(layer: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return TwoLayer(layer)


def train(
    probes: object = None,
    policy: str = "skip",
    *,
    model: nn.Module | None = None,
    steps: int = 6,
    backend: object = None,
    compile_model: bool = True,
    fullgraph: bool = False,
    accumulate: int = 1,
    fault: tuple[str, int] | None = None,
    guard_gets: str = "original",
    run_dir: object = None,
    vocab: int = 256,
) -> SimpleNamespace:
    """A plain loop over a (compiled) model with AdamW; ``probes=None`` is the bare loop without keel.

    Args:
        fault: ``("grad", step)`` writes a NaN into the head's gradient, ``("loss", step)`` makes that loss NaN.
        guard_gets: ``"original"`` hands `Guard` the model, ``"compiled"`` the ``torch.compile`` wrapper,
            ``"in_place"`` the model compiled with ``model.compile()``.

    Returns:
        model, guard, decisions, the graphs each forward ran (``per_forward``) and the backend.
    """
    torch._dynamo.reset()
    counters.clear()
    model = model if model is not None else _proxy()
    backend = backend if backend is not None else GraphCounter()
    if compile_model and guard_gets == "in_place":
        model.compile(backend=backend, fullgraph=fullgraph)
        forward = model
    else:
        forward = torch.compile(model, backend=backend, fullgraph=fullgraph) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = None
    if probes is not None:
        guard = keel.Guard(
            model if guard_gets == "original" else forward,
            opt,
            policy=policy,
            probes=probes,
            run_dir=None if run_dir is None else str(run_dir),
            log_every=1,
        )
    g = torch.Generator().manual_seed(1)
    decisions, per_forward = [], []
    for step in range(steps):
        for _ in range(accumulate):
            x = torch.randint(0, vocab, (4, SEQ + 1), generator=g)
            before = getattr(backend, "runs", 0)
            logits = forward(x[:, :-1])
            per_forward.append(getattr(backend, "runs", 0) - before)
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / accumulate
            if fault == ("loss", step):
                loss = loss * NAN
            loss.backward()
        if fault == ("grad", step):
            model.head.weight.grad[0, 0] = NAN
        if guard is not None:
            decisions.append(guard.step(loss * accumulate))
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if guard is not None:
        guard.close()
    return SimpleNamespace(model=model, guard=guard, decisions=decisions, per_forward=per_forward, backend=backend)


def observations(run_dir: object) -> dict[str, dict[int, float]]:
    """Every stored signal of a run: key → {step: value}."""
    with RunReader(run_dir) as run:
        return {
            key: dict(zip(run.signal(key)[0].tolist(), run.signal(key)[1].tolist(), strict=True))
            for key in run.signal_keys()
        }


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def probe(guard: keel.Guard, name: str) -> object:
    return next(p for p in guard.probes if p.name == name)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


# --- training under compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("probes", ["default", "transformer", pytest.param("full", marks=pytest.mark.slow)])
def test_skip_policy_trains_a_compiled_model_with_finite_observations(probes, tmp_path):
    run = train(probes, run_dir=tmp_path)
    assert [d.action for d in run.decisions] == ["ok"] * 6
    assert not run.guard.findings  # no keel_error: every probe ran under compile
    seen = observations(tmp_path)
    assert {"loss", "grad/norm", "param/norm"} <= set(seen)
    if probes == "full":  # read from parameters, gradients and optimizer state in Guard.step: outside the graph
        assert {"update/norm", "grad/weight_cos"} <= set(seen)  # adam_eps: every 50 steps, from step 50
    assert all(math.isfinite(v) for values in seen.values() for v in values.values())


@pytest.mark.parametrize("probes", ["default", pytest.param("transformer", marks=pytest.mark.slow)])
@pytest.mark.parametrize("where", ["grad", "loss"])
def test_nan_at_a_chosen_step_of_a_compiled_model_is_skipped(probes, where):
    run = train(probes, fault=(where, 3))
    assert [d.action for d in run.decisions] == ["ok", "ok", "ok", "skip", "ok", "ok"]
    skipped = run.decisions[3]
    assert any(f.kind == "non_finite" for f in skipped.findings)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())  # the NaN update never landed


@pytest.mark.parametrize("probes", ["default", pytest.param("transformer", marks=pytest.mark.slow)])
def test_observe_leaves_the_compiled_run_bit_identical(probes):
    bare = train(None, backend="aot_eager")
    observed = train(probes, "observe", backend="aot_eager")
    assert_same_parameters(bare.model, observed.model)


@pytest.mark.parametrize(
    "guard_gets",
    ["original", pytest.param("compiled", marks=pytest.mark.slow), pytest.param("in_place", marks=pytest.mark.slow)],
)
def test_guard_takes_the_model_or_its_compiled_wrapper(guard_gets, tmp_path):
    run = train("transformer", guard_gets=guard_gets, run_dir=tmp_path)
    prefix = "_orig_mod." if guard_gets == "compiled" else ""  # OptimizedModule's own parameter names
    seen = observations(tmp_path)
    assert f"grad/norm/{prefix}head.weight" in seen
    assert f"act/rms/{prefix}blocks.1" in seen and f"attn/max_logit/{prefix}blocks.0.attn" in seen
    assert run.per_forward == [1] * 6


# --- no graph break, no recompilation per micro-batch -------------------------------------------------------
def test_default_probes_add_no_graph_and_no_graph_break():
    bare = train(None)
    guarded = train("default")
    assert bare.per_forward == guarded.per_forward == [1] * 6
    assert guarded.backend.compiled == bare.backend.compiled == 1
    assert graph_breaks() == 0


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_explain_sees_one_graph_with_the_default_and_the_transformer_probes():
    model = _proxy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.zeros(2, SEQ, dtype=torch.long)
    bare = torch._dynamo.explain(model)(x)
    for probes in ("default", "transformer"):
        with keel.Guard(model, opt, probes=probes):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(x)
        assert (explained.graph_count, explained.graph_break_count) == (bare.graph_count, 0) == (1, 0), probes


@pytest.mark.parametrize("fullgraph", [pytest.param(False, marks=pytest.mark.slow), True])
def test_transformer_probes_keep_one_graph_per_forward(fullgraph):
    run = train("transformer", fullgraph=fullgraph, steps=12)  # steps 0 and 10 also measure attention entropy
    assert run.per_forward == [1] * 12
    assert graph_breaks() == 0
    assert not run.guard.findings


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_output_logit_probe_on_a_head_named_for_it_keeps_one_graph():
    probes = ["loss", OutputLogitsProbe(module="head")]
    run = train(probes, fullgraph=True)
    assert run.per_forward == [1] * 6 and graph_breaks() == 0


@pytest.mark.parametrize(
    "probes",
    [
        pytest.param(lambda: "transformer", id="transformer"),
        pytest.param(lambda: ["loss", OutputLogitsProbe(module="head")], id="named_head", marks=pytest.mark.slow),
    ],
)
def test_gradient_accumulation_does_not_recompile_per_micro_batch(probes):
    """A Python count that grows with each micro-batch made dynamo recompile the forward for every micro-batch
    (it specialises on the ints it reads); past ``recompile_limit`` (8) the forward fell back to eager, and with
    ``fullgraph=True`` the user's forward raised."""
    few = train(probes(), accumulate=2, steps=3)
    many = train(probes(), accumulate=9, steps=3, fullgraph=True)
    assert many.backend.compiled == few.backend.compiled <= torch._dynamo.config.recompile_limit
    assert many.per_forward == [1] * 27
    assert not many.guard.findings


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_graph_variants_over_a_cadence_cycle_stay_under_the_recompile_limit():
    """Each combination of the probes' cadences (attention entropy every 10 steps, output logits every 2) and the
    first vs a later micro-batch is one graph; with a measured head and accumulation that is 7 (docs/compile.md).
    ``fullgraph=True`` turns going past ``recompile_limit`` into an error in the user's forward."""
    probes = [
        "loss",
        "grad_norm",
        "param_norm",
        "attn_logits",
        "attn_entropy",
        OutputLogitsProbe(module="head"),
        "activation_rms",
    ]
    run = train(probes, steps=21, accumulate=2, fullgraph=True)
    assert run.backend.compiled <= torch._dynamo.config.recompile_limit
    assert run.per_forward == [1] * 42 and not run.guard.findings


# --- what keel sees under compile ---------------------------------------------------------------------------
COMPILED_PROXY_KEYS = {
    "loss",
    "grad/norm",
    "param/norm",
    "lr",
    "time/step",
    "act/rms",
    "act/max_abs",
    "act/format_max",  # the format the block outputs are held in (activation_growth judges act/max_abs by it)
    "attn/max_logit",
    "attn/entropy",
}


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_what_the_transformer_probes_see_on_the_compiled_proxy(tmp_path):
    run = train("transformer", run_dir=tmp_path)
    seen = observations(tmp_path)
    families = {k for k in seen if k.count("/") <= 1}  # leaves out the per-layer and per-parameter keys
    # the proxy hands its masked logits to a `logits_tap` child: hooked and traced, so attention is measured;
    # its output layer is called `head`, which keel must check feeds a softmax: not possible while tracing
    assert families == COMPILED_PROXY_KEYS
    assert not any(k.startswith("logits/") for k in seen)
    assert sorted(seen["attn/entropy"]) == [0]  # every 10 steps, as in eager
    assert set(seen["attn/max_logit"]) == set(range(6))
    status = probe(run.guard, "output_logits").status
    assert "torch.compile" in status and "module=" in status


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_hooked_values_under_compile_equal_eager(tmp_path):
    eager = train("transformer", compile_model=False, run_dir=tmp_path / "eager", steps=11)
    train("transformer", run_dir=tmp_path / "compiled", steps=11)
    a, b = observations(tmp_path / "eager"), observations(tmp_path / "compiled")
    hooked = [k for k in b if k.startswith(("act/", "attn/"))]
    assert len(hooked) > 10
    for key in hooked:
        assert b[key].keys() == a[key].keys(), key
        for step, value in b[key].items():
            assert value == pytest.approx(a[key][step], rel=1e-5, abs=1e-6), (key, step)
    assert any(k.startswith("logits/") for k in a)  # eager checks the head and measures it
    assert probe(eager.guard, "output_logits").status == "a softmax classifier head"


@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_output_logits_of_a_head_named_for_it_are_measured_under_compile(tmp_path):
    probes = ["loss", OutputLogitsProbe(module="head")]
    train(probes, run_dir=tmp_path / "compiled")
    train(["loss", OutputLogitsProbe(module="head")], compile_model=False, run_dir=tmp_path / "eager")
    a, b = observations(tmp_path / "eager"), observations(tmp_path / "compiled")
    logits = sorted(k for k in b if k.startswith("logits/"))
    assert logits == [
        "logits/log_z",
        "logits/log_z_max",
        "logits/log_z_min",
        "logits/mean",
        "logits/rms",
        "logits/softmax_collapse",
    ]
    for key in logits:
        assert sorted(b[key]) == [0, 2, 4]  # every 2 steps
        assert [b[key][s] for s in (0, 2, 4)] == pytest.approx([a[key][s] for s in (0, 2, 4)], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "layer",
    [FlashSelfAttention, CausalSelfAttention, MhaBlock],
    ids=["sdpa", "explicit_softmax", "multihead_attention"],
)
def test_intercepted_attention_is_not_seen_under_compile_and_breaks_nothing(layer, tmp_path):
    """Attention without a `logits_tap` child is read by intercepting torch calls (a TorchFunctionMode): that
    stays out while dynamo traces, so compiled attention gives no attn/* keys; the block hooks still measure."""
    probes = ["loss", create_probe("attn_logits", fused_every=1), "attn_entropy", "activation_rms"]
    run = train(probes, model=_two_layer(layer), fullgraph=True, vocab=11, run_dir=tmp_path)
    seen = observations(tmp_path)
    assert not any(k.startswith("attn/") for k in seen)
    assert {"act/rms/blocks.0", "act/rms/blocks.1"} <= set(seen)
    assert run.per_forward == [1] * 6 and graph_breaks() == 0
    eager = train(
        ["loss", create_probe("attn_logits", fused_every=1)],
        model=_two_layer(layer),
        compile_model=False,
        vocab=11,
        run_dir=tmp_path / "eager",
    )
    assert eager.decisions and "attn/max_logit" in observations(tmp_path / "eager")  # eager sees it


@pytest.mark.parametrize("closure_through", ["model", "compiled"])
def test_sharpness_closure_needs_the_uncompiled_model(closure_through, tmp_path):
    """The Hessian-vector products differentiate twice, which an AOT-autograd backend refuses: a closure through the
    compiled model turns the probe off with one keel_error; training goes on."""
    model = _proxy()
    compiled = torch.compile(model, backend="aot_eager")
    xb = torch.randint(0, 256, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    through = model if closure_through == "model" else compiled
    sharpness = create_probe(
        "sharpness",
        every=2,
        iters=2,
        trace_probes=0,
        closure=lambda: F.cross_entropy(through(xb[:, :-1]).flatten(0, 1), xb[:, 1:].flatten()),
    )
    run = train(["loss", sharpness], model=model, backend="aot_eager", steps=4, run_dir=tmp_path)
    assert [d.action for d in run.decisions] == ["ok"] * 4
    errors = [f.signal for f in run.guard.findings if f.kind == "keel_error"]
    measured = observations(tmp_path).get("curvature/sharpness", {})
    if closure_through == "model":
        assert not errors and sorted(measured) == [0, 2] and all(math.isfinite(v) for v in measured.values())
    else:
        assert errors == ["sharpness"] and not measured


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hugging_face_gpt2_under_compile(attention, tmp_path):
    """GPT-2 breaks its own compiled forward once (a logger call): keel adds no graph to it; its head is the output
    embeddings (trusted), so the output logits are measured in the graph; its attention is intercepted, not seen."""
    transformers = pytest.importorskip("transformers")

    def graphs_per_forward(probes: str | None) -> list[int]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, attn_implementation=attention
        )
        model = transformers.GPT2LMHeadModel(config)
        backend = GraphCounter()
        forward = torch.compile(model, backend=backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        guard = keel.Guard(model, opt, probes=probes, run_dir=str(tmp_path), log_every=1) if probes else None
        g, per_forward = torch.Generator().manual_seed(1), []
        for _ in range(4):
            x = torch.randint(0, 64, (4, SEQ), generator=g)
            before = backend.runs
            loss = forward(input_ids=x, labels=x).loss
            per_forward.append(backend.runs - before)
            loss.backward()
            guard.step(loss) if guard is not None else opt.step()
            opt.zero_grad(set_to_none=True)
        if guard is not None:
            guard.close()
            assert not guard.findings
        return per_forward

    assert graphs_per_forward("transformer") == graphs_per_forward(None)
    seen = observations(tmp_path)
    assert {"logits/log_z", "logits/zero_loss", "act/rms"} <= set(seen)
    assert not any(k.startswith("attn/") for k in seen)


# --- a compiled train step ----------------------------------------------------------------------------------
@pytest.mark.slow  # `make test-all`: the default suite keeps one check of each claim
def test_guard_step_outside_a_compiled_loss_function():
    model = _proxy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = GraphCounter()

    @torch.compile(backend=backend, fullgraph=True)
    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(1)
    with keel.Guard(model, opt, policy="skip", probes="transformer") as guard:
        actions = []
        for step in range(5):
            loss = loss_of(torch.randint(0, 256, (4, SEQ + 1), generator=g))
            loss.backward()
            if step == 2:
                model.head.weight.grad[0, 0] = NAN
            actions.append(guard.step(loss).action)
            opt.zero_grad(set_to_none=True)
    assert actions == ["ok", "ok", "skip", "ok", "ok"]
    assert graph_breaks() == 0 and not [f for f in guard.findings if f.kind == "keel_error"]


def test_guard_step_inside_a_compiled_train_step_is_left_out_of_the_graph():
    """`Guard.step` is host-side bookkeeping: dynamo traced into it and compiled graphs of keel's own code (9
    graphs instead of 2 over these 8 steps). Called inside a compiled function, it now costs what any function
    that ``torch.compiler.disable`` keeps out costs: one graph break."""

    def graphs_compiled(with_guard: bool) -> tuple[int, list[str]]:
        model = _proxy()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        guard = keel.Guard(model, opt, policy="skip") if with_guard else None  # no hooks: the forward is the same
        stand_in = torch.compiler.disable(lambda loss: opt.step())
        backend = GraphCounter()

        @torch.compile(backend=backend)
        def train_step(x: torch.Tensor, poison: bool) -> str:
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            if poison:
                model.head.weight.grad[0, 0] = NAN
            action = guard.step(loss).action if guard is not None else (stand_in(loss), "ok")[1]
            opt.zero_grad(set_to_none=True)
            return action

        torch._dynamo.reset()
        g = torch.Generator().manual_seed(1)
        actions = [train_step(torch.randint(0, 256, (4, SEQ + 1), generator=g), step == 2) for step in range(8)]
        if guard is not None:
            guard.close()
        return backend.compiled, actions

    with_guard, actions = graphs_compiled(True)
    assert actions == ["ok", "ok", "skip"] + ["ok"] * 5
    assert with_guard == graphs_compiled(False)[0]


# --- the real backend ---------------------------------------------------------------------------------------
@pytest.fixture
def deterministic():
    """Inductor's CPU embedding backward adds rows in a thread-dependent order: two bare compiled runs differ in
    the last bits of the embedding unless deterministic algorithms are on."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="inductor on CPU needs a C compiler")
@pytest.mark.parametrize("probes", ["default", "transformer"])
def test_inductor_end_to_end(probes, deterministic):
    bare = train(None, backend="inductor")
    observed = train(probes, "observe", backend="inductor")
    assert_same_parameters(bare.model, observed.model)
    skipped = train(probes, backend="inductor", fault=("grad", 3))
    assert graph_breaks() == 0
    assert [d.action for d in skipped.decisions] == ["ok", "ok", "ok", "skip", "ok", "ok"]
    assert not [f for f in skipped.guard.findings if f.kind == "keel_error"]
    assert all(torch.isfinite(p).all() for p in skipped.model.parameters())
