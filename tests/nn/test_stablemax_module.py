"""StableMax module: the paper's example, agreement with the loss-side functions, dtypes."""

from __future__ import annotations

import numpy as np
import torch

from keel.losses import log_stablemax, stablemax
from keel.nn import StableMax


def test_paper_example_and_log_form() -> None:
    x = torch.tensor([100.0, 0.0, -100.0])
    s = np.array([101.0, 1.0, 1.0 / 101.0])
    np.testing.assert_allclose(StableMax()(x).numpy(), s / s.sum(), rtol=1e-6)
    np.testing.assert_allclose(StableMax(log=True)(x).numpy(), np.log(s / s.sum()), rtol=1e-6)


def test_agrees_with_keel_losses_and_normalises_along_dim() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen) * 20
    torch.testing.assert_close(StableMax(dim=1)(x), stablemax(x, dim=1))
    torch.testing.assert_close(StableMax(dim=1, log=True)(x), log_stablemax(x, dim=1))
    torch.testing.assert_close(StableMax(dim=1)(x).sum(1), torch.ones(3, 5))


def test_no_collapse_and_finite_gradients_where_softmax_collapses() -> None:
    x = torch.tensor([[200.0, 0.0, 1.0]], requires_grad=True)
    assert x.softmax(-1)[0, 1].item() == 0.0  # float32 softmax: exactly zero
    probs = StableMax()(x)
    assert (probs > 0).all()
    probs[0, 1].backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).all()
    assert StableMax()(x.detach().bfloat16()).dtype == torch.float32
