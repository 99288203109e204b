"""Healthy QLoRA-style fine-tune: batch 2, heterogeneous snippets, many epochs, the loss ending low.

keel's tiny proxy pre-trained on the corpus (`_finetune.pretrained_base`), frozen with its block weights
rounded to 4 bits, and rank-32 LoRA adapters (α = 128) on every block linear, trained with AdamW at LR 3e-3
(warm-up 10, cosine) on 24 held-out snippets — easy and hard, long and short — in batches of two, reshuffled
each epoch, for 30 epochs (360 steps). Per-step losses swing by ±30 % and more between batches, the loss
falls at each epoch boundary as the adapters memorise the data, from ~1.8 to ~0.2, and the running median
wanders above the best one reached on a lucky stretch: the kind of run that raised divergence warnings.
A tiny model memorises slowly, so many short epochs (12 steps) stand in for a large model's few long ones.
No warning or critical finding may appear.
"""

from __future__ import annotations

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.harness.scenarios._finetune import BASE_SIZE, SEQ_LEN, Epochs, apply_lora, pretrained_base, snippets
from keel.proxy.trainer import TrainConfig

EXAMPLES, BATCH, EPOCHS, RANK = 24, 2, 30, 32


@SCENARIOS.register("qlora_finetune")
class QLoRAFinetune(LMScenario):
    spec = ScenarioSpec(
        name="qlora_finetune",
        healthy=True,
        expected_kind=None,
        summary=f"rank-{RANK} LoRA on a 4-bit frozen tiny proxy, batch {BATCH}, {EXAMPLES} mixed "
        f"snippets, {EPOCHS} epochs: noisy steps, drops at epoch boundaries",
    )

    def recipe(self, seed: int) -> TrainConfig:
        epochs = Epochs(*snippets(seed, EXAMPLES), batch_size=BATCH, seed=seed)

        def adapt(model):  # type: ignore[no-untyped-def]
            model.load_state_dict(pretrained_base(seed))
            return apply_lora(model, rank=RANK, alpha=4.0 * RANK, bits=4, seed=seed)

        return TrainConfig(
            size=BASE_SIZE,
            seq_len=SEQ_LEN,
            steps=EPOCHS * epochs.steps_per_epoch,
            lr=3e-3,
            warmup=10,
            batch_size=BATCH,
            batch_fn=epochs,
            model_fn=adapt,
            seed=seed,
        )
