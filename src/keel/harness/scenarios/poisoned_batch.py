"""A poisoned batch: one batch of random bytes whose targets all name one rare byte.

A healthy tiny-proxy run (LR 3e-3) gets, at step 150, a batch that corrupt data would produce: uniform
random input bytes and every target set to byte 0x00, which never occurs in the corpus. Its loss is
several times the running level and its gradient pushes the model towards the junk target, so the next
steps are worse too. keel's spike detector must call it critical at step 150 — before the update is
applied, which is when skipping it helps.
"""

from __future__ import annotations

import torch

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.trainer import Batch, TrainConfig

POISON_STEP = 150


def poison(step: int, batch: Batch) -> Batch:
    if step != POISON_STEP:
        return batch
    x, y = batch
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, x.shape, generator=g), torch.zeros_like(y)


@SCENARIOS.register("poisoned_batch")
class PoisonedBatch(LMScenario):
    spec = ScenarioSpec(
        name="poisoned_batch",
        healthy=False,
        expected_kind="loss_spike",
        summary=f"healthy tiny proxy, one junk batch (random bytes, constant target) at step {POISON_STEP}",
        fix="skip the poisoned update",
    )
    event_step = POISON_STEP

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=250, lr=3e-3, batch_fn=poison, seed=seed)

    def fixed(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=250, lr=3e-3, seed=seed)
