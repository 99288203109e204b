"""Tiny sweep settings shared by the sweep tests: a few steps of the tiny proxy, one validation batch."""

from __future__ import annotations

import pytest

from keel.proxy.sweep import SweepConfig
from keel.proxy.trainer import TrainConfig

# The run settings of a tiny sweep (its base TrainConfig), clipped at global norm 1 as the sweep's default.
TINY_RUN = dict(steps=4, batch_size=4, seq_len=16, warmup=2, eval_batches=1, max_grad_norm=1.0)
# Adam moves every weight by ~lr per step: at lr 1e3 the tiny proxy's loss leaves the finite range or ends
# far above its loss at initialisation within a few steps, i.e. it diverges.
DIVERGING_LR = 1e3
# The sweep-store fields two backends must agree on, bit for bit, for the same grid and seeds.
RESULT_KEYS = (
    "run_id",
    "status",
    "init_loss",
    "final_loss",
    "val_loss",
    "max_attn_logit",
    "log_z",
    "grad_norm",
    "n_params",
    "steps_done",
)


@pytest.fixture
def tiny_sweep():
    def make(**overrides) -> SweepConfig:
        """A tiny sweep; run settings (``steps=2``) go to its base config, the rest to the grid."""
        run = {name: overrides.pop(name) for name in list(overrides) if name in TINY_RUN}
        return SweepConfig(**{"sizes": ("tiny",), **overrides}, base=TrainConfig(**{**TINY_RUN, **run}))

    return make
