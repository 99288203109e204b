"""Likelihood displacement: DPO lowers the chosen response's likelihood, most on near-identical pairs (Razin et al.).

The tiny proxy LM, pre-trained on the corpus and fine-tuned on the chosen responses, is trained with sigmoid DPO
(β 0.5, AdamW 1e-4, batch 16) on a mixed set, as the data the paper filters: half the pairs near-identical (the
rejected response is the chosen one with a single byte replaced, `_dpo.corpus_pairs` "near"), half ordinary (the
rejected response is another corpus text). The margin grows, yet log π(y⁺|x) falls, on the near pairs most: their
rejected response shares nearly all its tokens and hidden states with the chosen one, so pushing it down pushes the
chosen one down too. keel should report ``likelihood_displacement`` on this unfiltered run.

Remedies measured, each trained bare from the same SFT model:

- the SFT-on-chosen regularizer (α = 1, `keel.losses.chosen_sft_loss`, TRL's ``loss_type=["sigmoid", "sft"]``);
- the CHES filter: drop the half of the pairs with the highest length-normalised CHES
  (`keel.data.filter_preference_pairs`) and train on the rest for the same number of epochs (the paper trains one
  epoch on each set), so half the optimizer steps;
- its control, a random drop of the same size and the same epochs: what is left of the CHES filter's effect
  beyond this control is CHES's, not fewer pairs' or fewer steps'.

The filtered runs report the chosen change over the kept pairs (what they trained on, the paper's metric), over all
pairs (the dropped chosen responses included), and the unfiltered run's change over the same kept pairs (the kept
pairs are the less displaced ones even without filtering: this is the comparison that removes that selection).

References:
    Razin et al. 2025, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization", ICLR,
    arXiv 2410.08847. Pang et al. 2024, arXiv 2404.19733 (the NLL term on the chosen response).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from keel.data import filter_preference_pairs
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._dpo import (
    DISPLACED_NATS,
    FULL,
    QUICK,
    DPORecipe,
    Pairs,
    ches,
    chosen_logps,
    displaced_step,
    sft_start,
    train_dpo,
)
from keel.harness.scenarios.rl._lm import RLRun
from keel.proxy.model import ProxyGPT

# Share of the highest-CHES pairs the filtered run drops: the size of the near-identical half of the mixed set, so a
# perfect ranking would drop exactly those. (The paper's SORRY-Bench recipe keeps the lowest 5%.)
CHES_DROP = 0.5
# The random-drop control draws its pairs from its own stream (an offset), not the DPO batches' seed
RANDOM_DROP_SEED_OFFSET = 1000
METRIC = "change of log π(y⁺|x) over the run (nats per 16-byte response, mean over all the pairs unless named)"


@RL_SCENARIOS.register("dpo_displacement")
class DPODisplacement:
    spec = ScenarioSpec(
        name="dpo_displacement",
        healthy=False,
        expected_kind="likelihood_displacement",
        summary="DPO (β 0.5, lr 1e-4) on a mixed set, half the pairs' rejected response differing from the chosen "
        "one in one byte: the margin grows while log π(y⁺|x) falls",
        fix="SFT-on-chosen regularizer α=1; CHES filter (drop the top half), against a random drop of the same size",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        setting = QUICK if quick else FULL
        start = time.perf_counter()
        model, pairs = sft_start(seed, "mixed", setting)
        n, n_near = len(pairs), len(pairs) // 2  # corpus_pairs "mixed": the near half first
        before = chosen_logps(model, pairs)
        plain = train_dpo(model, pairs, DPORecipe(steps=setting.dpo_steps), seed=seed, guarded=True)
        plain_change = chosen_logps(plain.model, pairs) - before
        anchored = train_dpo(model, pairs, DPORecipe(steps=setting.dpo_steps, sft_alpha=1.0), seed=seed, guarded=False)
        ranked = filter_preference_pairs(list(range(n)), scores=ches(model, pairs), drop_fraction=CHES_DROP)
        by_ches = torch.tensor(ranked.kept_indices)
        g = torch.Generator().manual_seed(RANDOM_DROP_SEED_OFFSET + seed)
        at_random = torch.randperm(n, generator=g)[: len(by_ches)].sort().values
        remedies = {}
        for name, kept in ((f"ches_filter_drop_{CHES_DROP}", by_ches), (f"random_drop_{CHES_DROP}", at_random)):
            change = _kept_run(model, pairs, kept, setting.dpo_steps, seed) - before
            remedies[name] = {
                "all_pairs": _mean(change),
                "kept_pairs": _mean(change[kept]),
                "kept_pairs_in_unfiltered_run": _mean(plain_change[kept]),
                "near_pairs_dropped": f"{n_near - int((kept < n_near).sum())}/{n_near}",
            }
        return RLRun(
            name=self.spec.name,
            trace=plain.trace,
            findings=plain.findings,
            wall_s=time.perf_counter() - start,
            harm_step=displaced_step(plain.trace),
            harm=f"the chosen per-token log-prob, 10-step mean, {DISPLACED_NATS} nats below the reference's",
            effect={
                "metric": METRIC,
                "pairs": f"{n_near} near-identical + {n - n_near} distinct",
                "without": _mean(plain_change),
                "without_near_pairs": _mean(plain_change[:n_near]),
                "without_distinct_pairs": _mean(plain_change[n_near:]),
                "with": {"sft_regularizer_alpha_1": _mean(chosen_logps(anchored.model, pairs) - before)} | remedies,
            },
        )


def _kept_run(model: ProxyGPT, pairs: Pairs, kept: Tensor, full_steps: int, seed: int) -> Tensor:
    """Every pair's log π(y⁺|x) after DPO on the ``kept`` pairs alone for the epochs the full run had (bare)."""
    steps = round(full_steps * len(kept) / len(pairs))
    result = train_dpo(model, pairs.take(kept), DPORecipe(steps=steps), seed=seed, guarded=False)
    return chosen_logps(result.model, pairs)


def _mean(change: Tensor) -> float:
    return round(change.mean().item(), 3)
