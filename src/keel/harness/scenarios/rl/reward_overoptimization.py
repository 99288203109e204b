"""Reward over-optimisation: GRPO against one proxy reward model raises the proxy while the gold reward peaks and falls.

Coste et al.'s synthetic set-up, on the tiny proxy LM. A response is 8 bytes sampled after a 16-byte corpus prompt;
its features are its byte histogram. The "gold" reward is a fixed random MLP of the features. Five proxy reward
models (the same MLP shape, 32 hidden units) are fit by Bradley–Terry to 300 pairs of the pre-trained policy's own
responses, labelled by the gold reward with 25% of the labels flipped, each then standardised on those
responses (mean 0, std 1: a Bradley–Terry fit fixes only differences); they differ in seed (initialisation, batch
order) and — unlike Coste et al., whose members see the same data — in a bootstrap resample of the pairs, which
is what makes five MLPs of this size disagree off their data. The policy is trained with GRPO (8 prompts × 8
samples, one optimizer step per rollout, AdamW 5e-4) against member 0 alone; every step logs the gold reward
(``rl/gold_reward``) and the ensemble's statistics (``rm/…``, `keel.signals.policy.reward_ensemble_signals`).
keel should report ``reward_overoptimization`` before the gold reward peaks. At 5e-4 the gold reward rises for ~30
steps, then falls below its start (Gao et al.'s shape); at 1e-3 it peaked by step ~20, barely past the 10 steps that
are a detector's baseline, too fast to be a fair test of a warning. Remedies measured: the same run against the
ensemble's worst case (WCO) and uncertainty-weighted (UWO) objectives (`keel.losses.ensemble_reward`).

References:
    Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization", ICLR, arXiv 2310.02743.
    Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization", ICML, arXiv 2210.10760.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core import keys
from keel.harness.scenarios._common import ScenarioSpec
from keel.harness.scenarios.rl import RL_SCENARIOS
from keel.harness.scenarios.rl._grpo import GRPORecipe, Task, train_grpo
from keel.harness.scenarios.rl._lm import RLRun, Trace, base_model, sample, trailing_mean
from keel.losses import ensemble_reward
from keel.proxy.corpus import ProxyBatches
from keel.proxy.model import ProxyGPT
from keel.signals import reward_ensemble_signals

PROMPT, RESPONSE, VOCAB = 16, 8, 256
MEMBERS, LABELLED_PAIRS, LABEL_NOISE = 5, 300, 0.25
GOLD_SEED = 7
GOLD_WINDOW = 10  # the gold peak is judged on a 10-step trailing mean (one rollout is noisy)
# Coste et al.'s best-of-n λ with the population variance (their PPO path uses 0.1 with the unbiased one); the
# members are standardised (`RewardMLP.standardise`), so λ is in units of their variance on the base policy's responses
UWO_LAMBDA = 0.5
LR = 5e-4  # the policy's AdamW LR: a ~30-step healthy rise of the gold reward before it turns
METRIC = "gold reward: peak and end (10-step means), and the drop from peak to end"


class RewardMLP(nn.Module):
    """``(tanh(features @ w1) @ w2 − shift) / spread``: the gold reward (``scale`` 3) and, trained, each proxy (init
    ``scale`` 0.1, then standardised by `standardise`)."""

    shift: Tensor
    spread: Tensor

    def __init__(self, seed: int, *, hidden: int = 32, scale: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(VOCAB, hidden, generator=g) * scale)
        self.w2 = nn.Parameter(torch.randn(hidden, generator=g) / hidden**0.5)
        self.register_buffer("shift", torch.tensor(0.0))
        self.register_buffer("spread", torch.tensor(1.0))

    def forward(self, responses: Tensor) -> Tensor:
        features = F.one_hot(responses, VOCAB).float().mean(dim=1)  # the byte histogram
        return (torch.tanh(features @ self.w1) @ self.w2 - self.shift) / self.spread

    def standardise(self, responses: Tensor) -> RewardMLP:
        """Mean 0 and standard deviation 1 on ``responses``: a Bradley–Terry fit fixes only reward differences, and
        members whose raw scales differ (a standard deviation of 2.4 to 4.0 here) would disagree in their std across
        members in proportion to how far every one of them rises, whether or not they agree on the responses."""
        with torch.no_grad():
            raw = self(responses)
            self.shift.copy_(raw.mean())
            self.spread.copy_(raw.std())
        return self


def corpus_prompts(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    data = ProxyBatches(batch_size=1, seq_len=PROMPT).data
    starts = torch.randint(len(data) - PROMPT, (n,), generator=g).tolist()
    return torch.stack([data[s : s + PROMPT] for s in starts]), None


def fit_proxy(member: int, a: Tensor, b: Tensor, labels: Tensor, *, steps: int = 300) -> RewardMLP:
    """One proxy: Bradley–Terry on a bootstrap resample of the labelled pairs, Adam 1e-2, batch 64."""
    model = RewardMLP(1000 + member, scale=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(member)
    boot = torch.randint(len(a), (len(a),), generator=g)
    for _ in range(steps):
        i = boot[torch.randint(len(a), (64,), generator=g)]
        loss = F.binary_cross_entropy_with_logits(model(a[i]) - model(b[i]), labels[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False)


def reward_models(policy: ProxyGPT, seed: int) -> tuple[RewardMLP, list[RewardMLP]]:
    """The gold reward and the proxies, fit to noisy gold labels of ``policy``'s own response pairs."""
    gold = RewardMLP(GOLD_SEED + seed, scale=3.0).requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 3)
    prompts, _ = corpus_prompts(LABELLED_PAIRS, g)
    a, b = sample(policy, prompts, RESPONSE, g), sample(policy, prompts, RESPONSE, g)
    with torch.no_grad():
        labels = (gold(a) > gold(b)).float()
    flip = torch.rand(LABELLED_PAIRS, generator=g) < LABEL_NOISE
    labels = torch.where(flip, 1 - labels, labels)
    both = torch.cat([a, b])
    return gold, [fit_proxy(m, a, b, labels).standardise(both) for m in range(MEMBERS)]


@dataclass(frozen=True)
class EnsembleTask:
    """The policy's reward: member 0 alone (``objective=None``), an ensemble objective over all members (``"wco"``,
    ``"uwo"``), or the gold reward itself (``"gold"``: the healthy control, `reward_healthy`)."""

    gold: RewardMLP
    proxies: list[RewardMLP]
    objective: str | None

    def reward(self, prompts: Tensor, answers: Tensor | None, responses: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            scores = torch.stack([proxy(responses) for proxy in self.proxies])  # (members, batch)
            gold = self.gold(responses)
        if self.objective is None:
            reward = scores[0]
        elif self.objective == "gold":
            reward = gold
        elif self.objective == "uwo":
            reward = ensemble_reward(scores, "uwo", uwo_lambda=UWO_LAMBDA, unbiased=False)
        else:
            reward = ensemble_reward(scores, self.objective)
        return reward, {**reward_ensemble_signals(scores), keys.RL_GOLD_REWARD: gold.mean()}

    def task(self) -> Task:
        return Task(prompts=corpus_prompts, reward=self.reward, length=RESPONSE)


def gold_curve(trace: Trace) -> dict[str, float | int]:
    gold = trailing_mean(trace.series(keys.RL_GOLD_REWARD), GOLD_WINDOW)
    peak = max(range(len(gold)), key=gold.__getitem__)
    return {
        "peak_step": peak,
        "peak": round(gold[peak], 3),
        "end": round(gold[-1], 3),
        "drop": round(gold[peak] - gold[-1], 3),
    }


@RL_SCENARIOS.register("reward_overoptimization")
class RewardOverOptimization:
    spec = ScenarioSpec(
        name="reward_overoptimization",
        healthy=False,
        expected_kind="reward_overoptimization",
        summary="GRPO against one of 5 proxy RMs fit to 300 noisy gold labels: the proxy reward climbs, the gold "
        "reward peaks and falls, the ensemble's disagreement grows",
        lead_required=True,
        fix="WCO / UWO ensemble objectives",
    )

    def run(self, *, seed: int = 0, quick: bool = False) -> RLRun:
        base_steps, rollouts = (300, 90) if quick else (300, 150)
        start = time.perf_counter()
        policy = base_model(seed, base_steps)
        gold, proxies = reward_models(policy, seed)
        recipe = GRPORecipe(rollouts=rollouts, lr=LR, groups=8, inner=1)
        single = EnsembleTask(gold, proxies, None).task()
        plain = train_grpo(policy, single, recipe, seed=seed, guarded=True)
        remedies = {
            name: gold_curve(
                train_grpo(policy, EnsembleTask(gold, proxies, name).task(), recipe, seed=seed, guarded=False).trace
            )
            for name in ("wco", "uwo")
        }
        curve = gold_curve(plain.trace)
        return RLRun(
            name=self.spec.name,
            trace=plain.trace,
            findings=plain.findings,
            wall_s=time.perf_counter() - start,
            harm_step=int(curve["peak_step"]),
            harm=f"the gold reward peaks ({GOLD_WINDOW}-step mean)",
            effect={"metric": METRIC, "without": curve, "with": remedies},
        )
