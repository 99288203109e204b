"""Healthy full fine-tune: batch 1, heterogeneous snippets, 16 epochs, the loss ending near 0.1.

keel's tiny proxy pre-trained on the corpus (`_finetune.pretrained_base`), every weight trained with AdamW at
LR 3e-3 (warm-up 10, cosine) on 16 held-out snippets — easy and hard, long and short — one per step,
reshuffled each epoch. The model memorises its data: the loss falls at each epoch boundary from ~2 to ~0.1,
and per-step losses at the end range over a factor of ten between examples. No warning or critical finding
may appear.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.harness.scenarios._finetune import BASE_SIZE, SEQ_LEN, Epochs, pretrained_base, snippets
from keel.proxy.trainer import TrainConfig

EXAMPLES, BATCH, EPOCHS = 16, 1, 16


@SCENARIOS.register("full_finetune")
class FullFinetune(LMScenario):
    spec = ScenarioSpec(
        name="full_finetune",
        healthy=True,
        expected_kind=None,
        summary=f"full fine-tune of the pre-trained tiny proxy, batch {BATCH}, {EXAMPLES} mixed "
        f"snippets, {EPOCHS} epochs: the loss falls from ~2 to ~0.1",
    )

    def recipe(self, seed: int) -> TrainConfig:
        epochs = Epochs(*snippets(seed, EXAMPLES), batch_size=BATCH, seed=seed)

        def load(model):  # type: ignore[no-untyped-def]
            model.load_state_dict(pretrained_base(seed))
            return model

        return TrainConfig(
            size=BASE_SIZE,
            seq_len=SEQ_LEN,
            steps=EPOCHS * epochs.steps_per_epoch,
            lr=3e-3,
            warmup=10,
            batch_size=BATCH,
            batch_fn=epochs,
            model_fn=load,
            seed=seed,
        )
