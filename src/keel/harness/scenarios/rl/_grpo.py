"""The policy-gradient scenarios' pieces: a GRPO loop under Guard, and the copy task with an exact-match reward.

One rollout samples ``group_size`` responses for each of ``groups`` prompts from the current policy, scores them,
and turns the rewards into group advantages (`keel.losses.group_advantages`, TRL's). The policy then takes
``inner`` optimizer steps on that rollout with the clipped surrogate (`keel.losses.clipped_policy_loss`,
token-level mean, DAPO's aggregation; no KL term, β = 0 as in DAPO and TRL's default): with more than one step
per rollout the ratio leaves 1 and the clip acts, which is where clip-higher (ε_high 0.28) differs from
ε_high = ε_low = 0.2. Each optimizer step hands Guard the loop's `keel.signals.policy_signals` — entropy, clip
fractions, advantages, rewards, zero-variance groups — plus what the task adds (a gold reward, ensemble
statistics). With β = 0 there is no reference policy and no ``rl/kl``, as TRL logs ``kl`` only when β ≠ 0.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from keel._core.finding import Finding
from keel.detect import policy_detectors
from keel.harness.scenarios.rl._lm import (
    MAX_GRAD_NORM,
    Trace,
    base_model,
    guard_for,
    response_logits,
    sample,
    token_logps,
)
from keel.losses import clipped_policy_loss, group_advantages
from keel.proxy.model import ProxyGPT
from keel.signals import policy_signals

# A task: prompts(n, generator) → (prompts, answers or None); reward(prompts, answers, responses) → rewards and
# any extra signals for Guard.
Prompts = Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]]
Reward = Callable[[Tensor, Tensor | None, Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Task:
    prompts: Prompts
    reward: Reward
    length: int  # response bytes


@dataclass(kw_only=True)
class GRPORecipe:
    """One GRPO run: ``rollouts`` × ``inner`` optimizer steps."""

    rollouts: int
    lr: float
    groups: int = 16
    group_size: int = 8
    inner: int = 4
    eps_low: float = 0.2
    eps_high: float = 0.2


@dataclass
class GRPOResult:
    trace: Trace
    findings: list[Finding]
    wall_s: float


def train_grpo(start: ProxyGPT, task: Task, recipe: GRPORecipe, *, seed: int, guarded: bool) -> GRPOResult:
    """GRPO from a copy of ``start``, under an observing Guard with `keel.detect.policy_detectors` if ``guarded``."""
    model = copy.deepcopy(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    guard = guard_for(model, optimizer, policy_detectors()) if guarded else None
    g = torch.Generator().manual_seed(seed + 11)
    trace = Trace()
    began = time.perf_counter()
    try:
        for _ in range(recipe.rollouts):
            prompts, answers = task.prompts(recipe.groups, g)
            prompts = prompts.repeat_interleave(recipe.group_size, 0)
            answers = None if answers is None else answers.repeat_interleave(recipe.group_size, 0)
            responses = sample(model, prompts, task.length, g)
            rewards, extra = task.reward(prompts, answers, responses)
            advantages = group_advantages(rewards, recipe.group_size)
            with torch.no_grad():
                old = token_logps(response_logits(model, prompts, responses), responses)
            for _ in range(recipe.inner):
                logits = response_logits(model, prompts, responses)
                logps = token_logps(logits, responses)
                out = clipped_policy_loss(logps, old, advantages, eps_low=recipe.eps_low, eps_high=recipe.eps_high)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                signals = policy_signals(
                    logits=logits.detach(),
                    logps=logps.detach(),
                    old_logps=old,
                    advantages=advantages,
                    epsilon_low=recipe.eps_low,
                    epsilon_high=recipe.eps_high,
                    rewards=rewards,
                    group_size=recipe.group_size,
                )
                signals |= extra
                if guard is not None:
                    guard.step(out.loss, grad_norm=grad_norm, signals=signals)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                trace.add(out.loss.detach(), grad_norm, signals)
    finally:
        if guard is not None:
            guard.close()
    return GRPOResult(
        trace=trace, findings=list(guard.findings) if guard is not None else [], wall_s=time.perf_counter() - began
    )


# --- the copy task --------------------------------------------------------------------------------------------
LETTERS = torch.tensor([ord(c) for c in "abcdefghijklmnop"])
COPY_LENGTH = 3
EQUALS = ord("=")


def copy_prompts(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` prompts ``"xyz="`` (3 of 16 letters) and their answers ``"xyz"``."""
    answers = LETTERS[torch.randint(len(LETTERS), (n, COPY_LENGTH), generator=g)]
    return torch.cat([answers, torch.full((n, 1), EQUALS)], dim=1), answers


def exact_match(prompts: Tensor, answers: Tensor | None, responses: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """1 for a response equal to the answer, else 0: the verifiable reward."""
    assert answers is not None
    return (responses == answers).all(dim=1).float(), {}


COPY_TASK = Task(prompts=copy_prompts, reward=exact_match, length=COPY_LENGTH)


@dataclass(frozen=True, kw_only=True)
class CopySetting:
    base_steps: int
    sft_steps: int
    rollouts: int


COPY_FULL = CopySetting(base_steps=300, sft_steps=150, rollouts=60)
COPY_QUICK = CopySetting(base_steps=150, sft_steps=150, rollouts=30)


def copy_start(seed: int, setting: CopySetting) -> ProxyGPT:
    """The corpus-pre-trained proxy after a short SFT on the copy task: it copies ~40% of prompts exactly."""
    model = base_model(seed, setting.base_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 5)
    for _ in range(setting.sft_steps):
        prompts, answers = copy_prompts(32, g)
        loss = -token_logps(response_logits(model, prompts, answers), answers).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model
