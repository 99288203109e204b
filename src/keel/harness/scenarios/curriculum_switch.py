"""Healthy run with a curriculum switch: the data moves from one part of the corpus to another at step 120.

keel's tiny proxy at LR 3e-3 trains for 120 steps on the first fifth of the stdlib corpus (one set of
modules), then on its second half (others, with other names, idioms and docstrings). The loss jumps when
the data changes and then falls again as the model adapts: a data-mixture change, not an instability. No
warning or critical finding may appear.
"""

from __future__ import annotations

import numpy as np
import torch

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.corpus import load_corpus
from keel.proxy.trainer import Batch, TrainConfig

SWITCH_STEP = 120


class _Regions:
    """Random windows from a slice of the corpus, reproducible from a seed."""

    def __init__(self, seed: int, seq_len: int = 64) -> None:
        data = load_corpus()
        cut = int(len(data) * 0.9)
        self.data = torch.from_numpy(data[:cut].astype(np.int64))
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed + 1)

    def sample(self, lo: float, hi: float, batch: int) -> Batch:
        n = len(self.data)
        starts = torch.randint(int(lo * n), int(hi * n) - self.seq_len - 1, (batch,), generator=self.generator)
        window = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]


@SCENARIOS.register("curriculum_switch")
class CurriculumSwitch(LMScenario):
    spec = ScenarioSpec(
        name="curriculum_switch",
        healthy=True,
        expected_kind=None,
        summary=f"healthy tiny proxy whose data switches to other modules at step {SWITCH_STEP}",
    )
    event_step = SWITCH_STEP

    def recipe(self, seed: int) -> TrainConfig:
        regions = _Regions(seed)

        def curriculum(step: int, batch: Batch) -> Batch:
            lo, hi = (0.0, 0.2) if step < SWITCH_STEP else (0.5, 1.0)
            return regions.sample(lo, hi, batch[0].shape[0])

        return TrainConfig(size="tiny", steps=250, lr=3e-3, batch_fn=curriculum, seed=seed)
