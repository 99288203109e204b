"""Likelihood displacement: DPO on near-identical pairs lowers the chosen response's likelihood (Razin et al. 2025).

The tiny proxy LM, pre-trained on the corpus and fine-tuned on the chosen responses, is trained with sigmoid DPO
(β 0.5, AdamW 1e-4, batch 16) on pairs whose rejected response is the chosen one with a single byte replaced
(`_dpo.corpus_pairs` "near"). The margin grows, yet log π(y⁺|x) falls: the rejected response shares nearly all of
its tokens and hidden states with the chosen one, so pushing it down pushes the chosen one down too. keel should
report ``likelihood_displacement``. Remedies measured: the SFT-on-chosen regularizer (α = 1, `keel.losses.
chosen_sft_loss`, TRL's ``loss_type=["sigmoid", "sft"]``), and dropping the half of the pairs with the highest
length-normalised CHES (`keel.data.filter_preference_pairs`), the chosen change then measured on the kept pairs.

References:
    Razin et al. 2025, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization", ICLR,
    arXiv 2410.08847. Pang et al. 2024, arXiv 2404.19733 (the NLL term on the chosen response).
"""

from __future__ import annotations

import time

import torch

from keel.data import filter_preference_pairs
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._dpo import (
    DISPLACED_NATS,
    FULL,
    QUICK,
    DPORecipe,
    ches,
    displaced_step,
    sft_start,
    train_dpo,
)
from keel.harness.scenarios.rl._lm import RLRun

# Share of the highest-CHES pairs the filtered run drops. Every pair here is near-identical by construction, so
# filtering can only keep the less alike half; the paper keeps the lowest 5% (keep_fraction=0.05).
CHES_DROP = 0.5
METRIC = "change of log π(y⁺|x) over the run (nats per 16-byte response, mean over the training pairs)"


@RL_SCENARIOS.register("dpo_displacement")
class DPODisplacement:
    spec = ScenarioSpec(
        name="dpo_displacement",
        healthy=False,
        expected_kind="likelihood_displacement",
        summary="DPO (β 0.5, lr 1e-4) on pairs whose rejected response differs from the chosen one in one byte: "
        "the margin grows while log π(y⁺|x) falls",
        fix="SFT-on-chosen regularizer α=1; CHES filter (drop the top half)",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        setting = QUICK if quick else FULL
        start = time.perf_counter()
        model, pairs = sft_start(seed, "near", setting)
        plain = train_dpo(model, pairs, DPORecipe(steps=setting.dpo_steps), seed=seed, guarded=True)
        ranked = filter_preference_pairs(list(range(len(pairs))), scores=ches(model, pairs), drop_fraction=CHES_DROP)
        kept = pairs.take(torch.tensor(ranked.kept_indices))
        filtered = train_dpo(model, kept, DPORecipe(steps=setting.dpo_steps), seed=seed, guarded=False)
        anchored = train_dpo(model, pairs, DPORecipe(steps=setting.dpo_steps, sft_alpha=1.0), seed=seed, guarded=False)
        return RLRun(
            name=self.spec.name,
            trace=plain.trace,
            findings=plain.findings,
            wall_s=time.perf_counter() - start,
            harm_step=displaced_step(plain.trace),
            harm=f"the chosen per-token log-prob, 10-step mean, {DISPLACED_NATS} nats below the reference's",
            effect={
                "metric": METRIC,
                "without": round(plain.chosen_end - plain.chosen_start, 3),
                "with": {
                    "sft_regularizer_alpha_1": round(anchored.chosen_end - anchored.chosen_start, 3),
                    f"ches_filter_drop_{CHES_DROP}": round(filtered.chosen_end - filtered.chosen_start, 3),
                },
            },
        )
