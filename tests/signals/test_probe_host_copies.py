"""No probe copies host memory to the model's device: on CUDA each such copy (from pageable memory) waits for the
device, a host sync beyond the step's one device→host read of the packed signals.

The meta device stands in for the accelerator here: a copy from the CPU to it is an op a dispatch mode sees, and a
probe that read a device value on the host would fail on it. The optimizer's step counts live on the CPU, as they
do on CUDA for ``torch.optim.AdamW`` (foreach, not capturable) and keel's SPAM. The CUDA twin counts real syncs
(`tests/gpu/test_cuda_autocast.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from keel.harness.scenarios._finetune import apply_lora
from keel.proxy import create_proxy_model
from keel.signals import FULL_PROBES, create_probe
from tests.signals.contexts import step_context
from tests.signals.test_router_probe import LinearGateMoe

_COPIES = (torch.ops.aten._to_copy, torch.ops.aten.copy_)


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over every token's features: running statistics for the norm_stats probe to read."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.flatten(0, -2)).view_as(x)


class HostToDevice(TorchDispatchMode):
    """Records every copy from a CPU tensor into a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in _COPIES:
            src, dst = (args[1], args[0]) if func._overloadpacket is torch.ops.aten.copy_ else (args[0], out)
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self.copies.append(f"{func} of a {tuple(src.shape)} tensor")
        return out


def _two_steps(name: str | None) -> tuple[list[str], list[str]]:
    """(keys measured, host→device copies) over a forward, backward and two measure/after-step rounds on meta."""
    model = create_proxy_model("tiny", seq_len=16)
    if name == "lora":  # adapters to measure: keel's own LoRA layout (lora_a / lora_b) on the block linears
        model = apply_lora(model, rank=4, alpha=8.0, bits=None, seed=0)
    if name == "router":  # routers to measure, in a layout that runs on meta (the proxy MoE's dispatch needs nonzero)
        for block in model.blocks:
            block.mlp = LinearGateMoe(model.config.d_model)
    if name == "norm_stats":  # running statistics to measure
        for block in model.blocks:
            block.ln_2 = TokenBatchNorm(model.config.d_model)
    model = model.to("meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        optimizer.state[p] = {
            "step": torch.tensor(3.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    probe = None
    if name is not None:
        # named head: trusted, so the one-time gradient check (a host read, documented) is not needed
        probe = create_probe(name, **({"module": "head"} if name == "output_logits" else {}))
        for cadence in ("every", "fused_every"):
            if hasattr(getattr(probe, "config", None), cadence):
                setattr(probe.config, cadence, 1)
        if hasattr(probe, "attach"):
            probe.attach(model)
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    keys: list[str] = []
    with HostToDevice() as mode:
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        ctx = step_context(model, optimizer, loss=loss)
        for _ in range(2):  # the second round sees what the first after-step kept (update ratios)
            if probe is not None:
                keys += [*probe.measure(ctx), *probe.after_step(ctx)]
    return keys, mode.copies


@pytest.mark.parametrize("name", FULL_PROBES)
def test_probe_never_copies_host_memory_to_the_device(name: str) -> None:
    _, bare = _two_steps(None)
    keys, copies = _two_steps(name)
    assert keys, f"{name} measured nothing on the meta device"
    assert copies == bare == []
