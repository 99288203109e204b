"""What the RL/preference scenarios share: the base model, response log-probabilities, sampling, the Guard.

The policy is keel's tiny proxy LM (`keel.proxy.model`, byte-level, 2 layers, d_model 64) pre-trained on the proxy
corpus (the standard library's source, `keel.proxy.corpus`) with the proxy trainer and no Guard. A prompt and its
response are byte strings laid end to end; a response's log-probability is the sum over its bytes of
log π(byte | prompt, earlier bytes), read from one forward pass over the whole sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.finding import Finding, severity_rank
from keel.detect import default_detectors
from keel.detect.detector import Detector
from keel.guard import Guard
from keel.proxy.model import ProxyGPT, create_proxy_model
from keel.proxy.trainer import TrainConfig, train_proxy

SIZE, SEQ_LEN = "tiny", 64
# The base sees its own stream of corpus batches (an offset prime), not one a scenario's seed also draws.
BASE_DATA_SEED_OFFSET = 7907
# TRL's default max_grad_norm (transformers TrainingArguments): the loops clip as a TRL run would.
MAX_GRAD_NORM = 1.0
# Guard's signal keys the rlwatch comparison reads besides the loop's own
LOSS, GRAD_NORM = "loss", keys.GRAD_NORM


@functools.lru_cache(maxsize=4)
def _base_state(seed: int, steps: int) -> dict[str, Tensor]:
    with torch.random.fork_rng():
        config = TrainConfig(
            size=SIZE,
            seq_len=SEQ_LEN,
            steps=steps,
            batch_size=8,
            lr=3e-3,
            warmup=20,
            min_lr_ratio=1.0,
            eval_batches=1,
            seed=seed + BASE_DATA_SEED_OFFSET,
        )
        model = train_proxy(config).model
        assert model is not None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_model(seed: int, steps: int) -> ProxyGPT:
    """A fresh copy of the tiny proxy pre-trained ``steps`` steps on the corpus (cached per process and seed)."""
    model = create_proxy_model(SIZE, seq_len=SEQ_LEN)
    model.load_state_dict(_base_state(seed, steps))
    return model


def response_logits(model: nn.Module, prompts: Tensor, responses: Tensor) -> Tensor:
    """``(B, R, V)`` logits at the positions that predict each response byte (one forward over prompt + response)."""
    seq = torch.cat([prompts, responses], dim=1)
    return model(seq[:, :-1])[:, prompts.shape[1] - 1 :]


def token_logps(logits: Tensor, tokens: Tensor) -> Tensor:
    """``(B, R)`` log-probabilities of ``tokens`` under ``logits`` (float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(model: nn.Module, prompts: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """``(B, length)`` response bytes sampled at temperature 1 (no end token: every response has ``length`` bytes)."""
    seq = prompts
    for _ in range(length):
        probs = torch.softmax(model(seq)[:, -1].float(), dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return seq[:, prompts.shape[1] :]


def guard_for(model: nn.Module, optimizer: torch.optim.Optimizer, detectors: Sequence[Detector]) -> Guard:
    """An observing Guard with keel's default probes, its default detectors and the scenario's RL/preference ones."""
    return Guard(model, optimizer, policy="observe", detectors=[*default_detectors(), *detectors])


@dataclass
class Trace:
    """The per-step statistics a run logged (keel keys → floats), as a user's logger would have them."""

    steps: list[dict[str, float]] = field(default_factory=list)

    def add(self, loss: Tensor, grad_norm: Tensor, signals: dict[str, Tensor]) -> None:
        row = {key: float(value) for key, value in signals.items()}
        row[LOSS], row[GRAD_NORM] = float(loss), float(grad_norm)
        self.steps.append(row)

    def series(self, key: str) -> list[float]:
        return [row.get(key, math.nan) for row in self.steps]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window − 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class RLRun:
    """One scenario run: its logged trace, keel's findings, when harm began, and the remedy's effect.

    Attributes:
        harm_step: The step at which the run's own metric degraded (chosen log-prob displaced, reward stalled,
            gold reward peaked); lead time is measured against it. None for a healthy run.
        harm: How ``harm_step`` was judged, in words.
        effect: ``{"metric": ..., "without": x, "with": {remedy: y, ...}}``: the remedy runs' figures.
    """

    name: str
    trace: Trace
    findings: list[Finding]
    wall_s: float = 0.0
    harm_step: int | None = None
    harm: str = ""
    effect: dict[str, Any] = field(default_factory=dict)

    def alarms(self) -> list[Finding]:
        """Warning and critical findings, in step order."""
        return [f for f in self.findings if severity_rank(f.severity) >= 1]
