"""Guard.evaluate → EvalStability: per-example scores and plain values reach the tracker, its signals the store."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from keel import Guard
from keel._core import keys
from keel._core.rank_correlation import kendall_tau_b
from keel.store.reader import RunReader


def _loop(tmp_path, setup, steps=12):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Guard(model, opt, run_dir=str(tmp_path)) as guard:
        setup(guard)
        for _ in range(steps):
            x = torch.randn(16, 4)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    return RunReader(tmp_path)


def test_per_example_scores_give_rank_tau_and_monotonicity_at_each_eval_step(tmp_path):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    target = x.sum(1)

    def per_example_error(model: nn.Module) -> torch.Tensor:
        return (model(x).squeeze(1) - target).pow(2)  # one score per example, lower is better

    with _loop(tmp_path, lambda g: g.evaluate("err", per_example_error, every=2, goal="min")) as reader:
        eval_steps, values = reader.signal(keys.EVAL_PER_NAME + "err")
        tau_steps, taus = reader.signal(keys.EVAL_RANK_TAU_PER_EVAL + "err")
        mono_steps, monos = reader.signal(keys.EVAL_MONOTONICITY_PER_EVAL + "err")
    assert eval_steps.tolist() == [1, 3, 5, 7, 9, 11]
    assert tau_steps.tolist() == mono_steps.tolist() == [5, 7, 9, 11]  # from the third checkpoint on
    assert monos[-1] == kendall_tau_b(range(6), -values)  # goal "min": a falling error counts as improving
    assert all(-1.0 <= t <= 1.0 for t in taus) and math.isfinite(taus[-1])


def test_a_plain_eval_gets_monotonicity_only(tmp_path):
    values = iter([0.1, 0.3, 0.2, 0.4, 0.5, 0.6])
    with _loop(tmp_path, lambda g: g.evaluate("acc", lambda m: next(values), every=2)) as reader:
        _, monos = reader.signal(keys.EVAL_MONOTONICITY_PER_EVAL + "acc")
        assert keys.EVAL_RANK_TAU_PER_EVAL + "acc" not in reader.signal_keys()
    assert np.allclose(monos, [1 / 3, 4 / 6, 8 / 10, 13 / 15])  # (C − D) / pairs: one discordant pair (0.3, 0.2)
