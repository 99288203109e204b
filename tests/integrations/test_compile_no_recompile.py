"""A compiled forward under keel compiles its graphs in the first steps and never again (issue 13, `keel bench
overhead --compile`): a probe's cadence must not change what dynamo guards on.

The attention tap's hook on keel's proxy (a ``logits_tap`` child) is traced into the user's graph, so every piece of
Python state it reads becomes a guard. It read the fused-attention request, which `AttnLogitsProbe` turns on every
``fused_every`` (10) steps — for fused sites, which a tapped site never is — so step 10 recompiled the whole forward
(with inductor: seconds, inside `keel bench overhead --compile`'s timed blocks: ratio 36x, steady 1.19).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import keel
from keel.harness.bench._compile_warmup import cadences, compile_warmup_steps
from keel.proxy import create_proxy_model
from keel.signals._attention_tap import AttentionTap
from tests.integrations.test_compile import GraphCounter

SEQ = 16
WARMUP = 2  # step 0 compiles; step 1 once more (the tap's sums exist now: a guard on `max_logit is None`)


def graphs_compiled_per_step(probes: str, after_warmup: int) -> tuple[list[int], int]:
    """Graphs dynamo captured at each step of a compiled tiny proxy under ``Guard(probes=probes, log_every=1)``,
    run for `keel bench overhead --compile`'s warm-up and ``after_warmup`` steps more; and that warm-up."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=SEQ)
    backend = GraphCounter()
    forward = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    guard = keel.Guard(model, opt, policy="observe", probes=probes, log_every=1)
    warmup = compile_warmup_steps(guard, minimum=0)
    g = torch.Generator().manual_seed(1)
    compiled = []
    for _ in range(warmup + after_warmup):
        x = torch.randint(0, 256, (2, SEQ + 1), generator=g)
        before = backend.compiled
        loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
        compiled.append(backend.compiled - before)
    guard.close()
    return compiled, warmup


@pytest.mark.slow  # ~70 compiled steps of the full probes: ~20 s; the tapped-site test below is the default check
@pytest.mark.parametrize("probes", ["transformer", "full"])
def test_a_compiled_forward_under_keel_compiles_no_graph_after_the_bench_warm_up(probes: str) -> None:
    compiled, warmup = graphs_compiled_per_step(probes, 15)
    assert warmup >= 12  # past the attention entropy's every-10 step, whose graph is its own
    assert 1 <= sum(compiled[:warmup]) <= 4, compiled  # step 0, step 1, the entropy step: each once
    assert compiled[warmup:] == [0] * 15, compiled


def test_the_bench_warm_up_covers_every_cadence_of_the_full_probes() -> None:
    model = create_proxy_model("tiny", seq_len=SEQ)
    guard = keel.Guard(model, torch.optim.AdamW(model.parameters()), probes="full", log_every=1)
    try:
        assert {2, 10, 50} <= cadences(guard)  # output_logits, attn_entropy / fused attention, adam_eps
        assert compile_warmup_steps(guard, minimum=5) == 52  # lcm(1, 2, 10, 50) + the step after the first
        assert compile_warmup_steps(None, minimum=5) == 5  # the bare loop: its own warm-up
    finally:
        guard.close()


class _Attention(torch.nn.Module):
    """The smallest attention a tap hooks directly: its masked logits pass through a ``logits_tap`` child."""

    def __init__(self) -> None:
        super().__init__()
        self.logits_tap = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_tap(x @ x.transpose(-2, -1)).softmax(-1) @ x


def test_a_tapped_site_does_not_recompile_when_the_fused_attention_request_changes() -> None:
    torch._dynamo.reset()
    model = torch.nn.Sequential(_Attention())
    tap = AttentionTap(model, modules=["0"])
    request = tap.subscribe(object())
    request.max_logit = True
    backend = GraphCounter()
    forward = torch.compile(model, backend=backend)
    x = torch.randn(2, 4, 8)
    compiled = []
    for fused in (False, False, False, True, False):  # what AttnLogitsProbe asks on its fused_every steps
        request.fused = fused
        before = backend.compiled
        forward(x)
        assert tap.read(), "the tap measured nothing: the test would prove nothing"
        compiled.append(backend.compiled - before)
    assert compiled[WARMUP:] == [0, 0, 0], compiled
