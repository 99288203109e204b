"""`keel.guard.host_side`: `Guard.step` is kept out of dynamo's graphs as ``@torch.compiler.disable`` kept it, without
importing ``torch._dynamo`` when keel is imported (it was 2.2 of the 2.6 s ``import keel.guard`` took after torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from keel.guard.host_side import host_side


def test_importing_the_guard_and_watch_leaves_torch_dynamo_unimported():
    code = "import sys, keel.guard, keel.integrations.watch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow  # compiles (~4 s here); Guard.step under compile: tests/integrations/test_compile.py
def test_a_host_side_function_runs_eagerly_between_two_graphs_of_a_compiled_caller():
    seen = []

    @host_side
    def bookkeeping(x: torch.Tensor) -> float:
        seen.append(torch.compiler.is_compiling())  # True if dynamo traced into it
        return float(x.sum())

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=backend)
    def step(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        bookkeeping(y)
        return y + 1

    torch._dynamo.reset()
    for _ in range(3):
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 3.0))
    assert seen == [False] * 3 and len(graphs) == 2  # one graph each side of the call, compiled once
    assert bookkeeping.__name__ == "bookkeeping" and bookkeeping(torch.ones(2)) == 2.0
