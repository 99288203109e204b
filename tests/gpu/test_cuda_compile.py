"""CUDA twins of the compile tests (`tests/integrations/test_compile.py`): `keel.Guard` around a ``torch.compile``d
proxy on the device, under bf16 autocast, with the default and the transformer probes (issue 13, item 2).

On the device the default backend (inductor) generates Triton kernels: keel's hooks must add no graph break there
either, a NaN step is still skipped before its update, and ``observe`` leaves the compiled run bit-identical (with
deterministic algorithms: the embedding's backward otherwise adds in a run-dependent order).

Marked ``gpu``: ``pytest -m gpu tests/gpu``. ``KEEL_TEST_DEVICE=cpu`` runs the same checks on the CPU (inductor
there needs a C compiler), which is how they were written without a device.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import keel
from keel.proxy import create_proxy_model
from tests.gpu.test_cuda_autocast import deterministic  # noqa: F401 (a fixture)
from tests.integrations.test_compile import GraphCounter, assert_same_parameters, graph_breaks

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("KEEL_TEST_DEVICE", "cuda")
SEQ = 32
NAN = float("nan")


@pytest.fixture(autouse=True)
def device() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if DEVICE == "cpu" and not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("inductor on the CPU needs a C compiler")


def train(
    probes: str | None, policy: str = "skip", *, backend: object = "inductor", nan_at: int = -1
) -> SimpleNamespace:
    """Six steps of the tiny proxy, compiled, forward and loss under bf16 autocast; ``probes=None``: no keel."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=SEQ).to(DEVICE)
    forward = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    guard = keel.Guard(model, opt, policy=policy, probes=probes, log_every=1) if probes is not None else None
    g = torch.Generator().manual_seed(1)
    decisions, per_forward = [], []
    for step in range(6):
        x = torch.randint(0, 256, (4, SEQ + 1), generator=g).to(DEVICE)
        before = getattr(backend, "runs", 0)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        per_forward.append(getattr(backend, "runs", 0) - before)
        loss.backward()
        if step == nan_at:
            model.head.weight.grad[0, 0] = NAN
        if guard is not None:
            decisions.append(guard.step(loss))
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if guard is not None:
        guard.close()
    return SimpleNamespace(model=model, guard=guard, decisions=decisions, per_forward=per_forward)


@pytest.mark.parametrize("probes", ["default", "transformer"])
def test_keel_adds_no_graph_and_no_graph_break_to_a_compiled_bf16_forward(probes: str) -> None:
    bare = train(None, backend=GraphCounter())
    watched = train(probes, backend=GraphCounter())
    assert graph_breaks() == 0
    assert watched.per_forward == bare.per_forward  # the graphs each forward runs: keel adds none


@pytest.mark.parametrize("probes", ["default", "transformer"])
def test_a_nan_in_a_compiled_bf16_run_is_skipped_before_its_update(probes: str) -> None:
    run = train(probes, nan_at=3)
    assert [d.action for d in run.decisions] == ["ok", "ok", "ok", "skip", "ok", "ok"]
    assert any(f.kind == "non_finite" for f in run.decisions[3].findings)
    assert not [f for f in run.guard.findings if f.kind == "keel_error"]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("probes", ["default", "transformer"])
def test_observe_leaves_the_compiled_bf16_run_bit_identical(probes: str) -> None:
    bare = train(None)
    observed = train(probes, "observe")
    assert_same_parameters(bare.model, observed.model)
