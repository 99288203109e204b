"""``Guard(sync="deferred")`` on CUDA: no host sync added to a healthy step, and the host path's training.

Run on a lent device: ``pytest -m gpu tests/gpu -q``. The CPU half of these claims is `tests/guard/test_deferred.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel.guard import Guard
from keel.proxy import create_proxy_model
from tests.gpu.test_cuda_autocast import SYNC, counting_syncs
from tests.integrations.autocast_run import batches

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _run(sync: str | None, steps: int = 8, nan_at: int | None = None) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Syncs of each whole step, and the parameters after it (sync None: the bare loop)."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = Guard(model, optimizer, policy="skip", sync=sync) if sync is not None else None
    counts, params = [], []
    for step, batch in enumerate(batches(steps, DEVICE)):
        with counting_syncs() as caught:
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            if step == nan_at:
                loss = loss * math.nan
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts.append(sum(SYNC in str(w.message) for w in caught))
        params.append([p.detach().clone() for p in model.parameters()])
    if guard is not None:
        guard.close()
    return counts, params


def test_a_deferred_step_adds_no_host_sync_to_the_bare_step() -> None:
    bare, _ = _run(None)
    deferred, _ = _run("deferred")
    step, _ = _run("step")
    assert [d - b for d, b in zip(deferred[1:], bare[1:], strict=True)] == [0] * (len(bare) - 1), (bare, deferred)
    assert all(s > b for s, b in zip(step[1:], bare[1:], strict=True)), (bare, step)  # the control


def test_deferred_on_cuda_trains_like_the_host_path_and_skips_the_nan_on_the_device() -> None:
    _, host = _run("step", nan_at=3)
    _, device = _run("deferred", nan_at=3)
    for a, b in zip(host, device, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
