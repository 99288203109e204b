"""The preference scenarios' pieces: corpus pairs, a short SFT on the chosen responses, and a DPO loop under Guard.

A pair is a 24-byte prompt from the corpus, its real 16-byte continuation as the chosen response, and a rejected
response that is either the chosen one with one byte replaced in its first half ("near": the engineered
near-identical pairs of Razin et al. 2025, whose chosen likelihood DPO displaces) or the 16 bytes of another
corpus window ("distinct": ordinary pairs); a "mixed" set has both, half each, as the data Razin et al. filter by
CHES. The policy is first fine-tuned on the chosen responses, as DPO runs
start from an SFT model, and that SFT model is also the frozen reference.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from keel._core.finding import Finding
from keel.data import ches_scores
from keel.detect import preference_detectors
from keel.harness.scenarios.rl._lm import MAX_GRAD_NORM, Trace, guard_for, response_logits, token_logps
from keel.losses import chosen_sft_loss, dpo_loss
from keel.proxy.corpus import ProxyBatches
from keel.proxy.model import ProxyGPT
from keel.signals import policy_signals, preference_signals

PROMPT, RESPONSE = 24, 16
PAIR_KINDS = ("near", "distinct", "mixed")
# The distinct half of a mixed set draws its corpus windows from another seed than the near half
MIXED_DISTINCT_SEED_OFFSET = 100
PRINTABLE = (32, 127)  # the replacement byte of a "near" pair: printable ASCII, never the byte it replaces


@dataclass
class Pairs:
    """Preference pairs: prompts ``(n, PROMPT)``, chosen and rejected responses ``(n, RESPONSE)`` (byte ids)."""

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: Tensor) -> Pairs:
        return Pairs(prompts=self.prompts[idx], chosen=self.chosen[idx], rejected=self.rejected[idx])


def corpus_pairs(seed: int, n: int, kind: str) -> Pairs:
    """``n`` pairs from the corpus's training split; ``kind`` is one of `PAIR_KINDS` (module docstring).

    A ``"mixed"`` set holds ``n // 2`` near pairs first, then ``n − n // 2`` distinct ones.
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(PAIR_KINDS)}")
    if kind == "mixed":
        near = corpus_pairs(seed, n // 2, "near")
        distinct = corpus_pairs(seed + MIXED_DISTINCT_SEED_OFFSET, n - n // 2, "distinct")
        return Pairs(
            prompts=torch.cat([near.prompts, distinct.prompts]),
            chosen=torch.cat([near.chosen, distinct.chosen]),
            rejected=torch.cat([near.rejected, distinct.rejected]),
        )
    data = ProxyBatches(batch_size=1, seq_len=PROMPT + RESPONSE).data
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - PROMPT - RESPONSE, (n,), generator=g).tolist()
    prompts = torch.stack([data[s : s + PROMPT] for s in starts])
    chosen = torch.stack([data[s + PROMPT : s + PROMPT + RESPONSE] for s in starts])
    if kind == "distinct":
        others = torch.randint(len(data) - RESPONSE, (n,), generator=g).tolist()
        return Pairs(prompts=prompts, chosen=chosen, rejected=torch.stack([data[s : s + RESPONSE] for s in others]))
    rejected = chosen.clone()
    positions = torch.randint(RESPONSE // 2, (n,), generator=g).tolist()
    for i, pos in enumerate(positions):
        new = int(chosen[i, pos])
        while new == int(chosen[i, pos]):
            new = int(torch.randint(*PRINTABLE, (1,), generator=g))
        rejected[i, pos] = new
    return Pairs(prompts=prompts, chosen=chosen, rejected=rejected)


def sft_on_chosen(model: ProxyGPT, pairs: Pairs, *, steps: int, lr: float = 1e-3, batch: int = 16, seed: int) -> None:
    """Fine-tune ``model`` in place on the chosen responses (mean NLL of their bytes), plain AdamW, no Guard."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=g)
        logps = token_logps(response_logits(model, pairs.prompts[idx], pairs.chosen[idx]), pairs.chosen[idx])
        loss = -logps.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def ches(model: ProxyGPT, pairs: Pairs) -> Tensor:
    """Each pair's length-normalised CHES (`keel.data.ches_scores`) from the model's last-layer hidden states.

    The states are the final LayerNorm's output (what the head reads, as ``hidden_states[-1]`` of a Hugging Face
    causal LM) at the positions that predict each of the R response bytes, as the official ``ches.py``: the state at
    the last byte itself predicts no response byte and is left out.
    """
    return ches_scores(
        _HiddenStates(model), pairs.prompts, pairs.chosen, pairs.rejected, length_normalize=True, batch_size=len(pairs)
    )


class _HiddenStates(nn.Module):
    """The proxy LM behind the Hugging Face call `ches_scores` makes: ``hidden_states[-1]`` is the ln_f output.

    The attention mask is not needed: the model is causal and `ches_scores` pads on the right, after every real
    position.
    """

    def __init__(self, model: ProxyGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool) -> SimpleNamespace:
        states: list[Tensor] = []
        hook = self.model.ln_f.register_forward_hook(lambda module, args, out: states.append(out))
        try:
            self.model(input_ids)
        finally:
            hook.remove()
        return SimpleNamespace(hidden_states=(states[0],))


@torch.no_grad()
def chosen_logps(model: ProxyGPT, pairs: Pairs) -> Tensor:
    """``(n,)`` log π(y⁺|x) of each pair, summed over the response's bytes."""
    return token_logps(response_logits(model, pairs.prompts, pairs.chosen), pairs.chosen).sum(-1)


def chosen_logp(model: ProxyGPT, pairs: Pairs) -> float:
    """Mean over pairs of log π(y⁺|x), summed over the response's bytes."""
    return chosen_logps(model, pairs).mean().item()


@dataclass(kw_only=True)
class DPORecipe:
    """One DPO run. ``sft_alpha`` > 0 adds the SFT-on-chosen regularizer (`keel.losses.chosen_sft_loss`)."""

    steps: int
    lr: float = 1e-4
    beta: float = 0.5
    batch: int = 16
    sft_alpha: float = 0.0


@dataclass
class DPOResult:
    model: ProxyGPT
    trace: Trace
    findings: list[Finding]
    chosen_start: float
    chosen_end: float
    wall_s: float


def train_dpo(sft_model: ProxyGPT, pairs: Pairs, recipe: DPORecipe, *, seed: int, guarded: bool) -> DPOResult:
    """DPO on ``pairs`` from a copy of ``sft_model`` (also the reference), under an observing Guard if ``guarded``.

    Each step hands Guard the loop's `keel.signals.preference_signals` (and the chosen responses' token entropy, as
    TRL's DPOTrainer logs ``entropy``); gradients are clipped at TRL's default norm 1 and the norm handed to Guard.
    """
    model = copy.deepcopy(sft_model)
    with torch.no_grad():
        ref_chosen = token_logps(response_logits(sft_model, pairs.prompts, pairs.chosen), pairs.chosen).sum(-1)
        ref_rejected = token_logps(response_logits(sft_model, pairs.prompts, pairs.rejected), pairs.rejected).sum(-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    guard = guard_for(model, optimizer, preference_detectors()) if guarded else None
    g = torch.Generator().manual_seed(seed + 1)
    trace = Trace()
    start = time.perf_counter()
    chosen_start = chosen_logp(model, pairs)
    batch_size = min(recipe.batch, len(pairs))  # a filtered set may hold fewer pairs than one batch
    tokens = torch.full((batch_size,), float(RESPONSE))
    try:
        for _ in range(recipe.steps):
            idx = torch.randperm(len(pairs), generator=g)[:batch_size]
            batch = pairs.take(idx)
            logits = response_logits(
                model, torch.cat([batch.prompts, batch.prompts]), torch.cat([batch.chosen, batch.rejected])
            )
            logps = token_logps(logits, torch.cat([batch.chosen, batch.rejected]))
            chosen_tok, rejected_tok = logps[:batch_size], logps[batch_size:]
            out = dpo_loss(
                chosen_tok.sum(-1), rejected_tok.sum(-1), ref_chosen[idx], ref_rejected[idx], beta=recipe.beta
            )
            loss = out.loss
            if recipe.sft_alpha:
                loss = loss + chosen_sft_loss(chosen_tok, alpha=recipe.sft_alpha)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            signals = preference_signals(
                chosen_tok.detach().sum(-1),
                rejected_tok.detach().sum(-1),
                ref_chosen_logps=ref_chosen[idx],
                ref_rejected_logps=ref_rejected[idx],
                beta=recipe.beta,
                chosen_tokens=tokens,
                rejected_tokens=tokens,
            )
            signals |= policy_signals(logits=logits[:batch_size].detach())  # TRL DPO's `entropy`
            if guard is not None:
                guard.step(loss, grad_norm=grad_norm, signals=signals)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trace.add(loss.detach(), grad_norm, signals)
    finally:
        if guard is not None:
            guard.close()
    return DPOResult(
        model=model,
        trace=trace,
        findings=list(guard.findings) if guard is not None else [],
        chosen_start=chosen_start,
        chosen_end=chosen_logp(model, pairs),
        wall_s=time.perf_counter() - start,
    )


@dataclass(frozen=True, kw_only=True)
class DPOSetting:
    """Sizes of a preference scenario, full and ``quick``."""

    base_steps: int
    pairs: int
    sft_steps: int
    dpo_steps: int


FULL = DPOSetting(base_steps=300, pairs=64, sft_steps=300, dpo_steps=120)
QUICK = DPOSetting(base_steps=150, pairs=32, sft_steps=150, dpo_steps=60)
# Harm: the chosen response's per-token log-probability, averaged over the last DISPLACED_WINDOW steps, is
# DISPLACED_NATS below the reference's (each chosen byte ~5% less likely than after SFT).
DISPLACED_NATS, DISPLACED_WINDOW = 0.05, 10


def sft_start(seed: int, kind: str, setting: DPOSetting) -> tuple[ProxyGPT, Pairs]:
    """The SFT model DPO starts from, and the pairs it was fine-tuned on."""
    from keel.harness.scenarios.rl._lm import base_model

    pairs = corpus_pairs(seed + 1, setting.pairs, kind)
    model = base_model(seed, setting.base_steps)
    sft_on_chosen(model, pairs, steps=setting.sft_steps, seed=seed)
    return model, pairs


def displaced_step(trace: Trace) -> int | None:
    """The first step whose trailing mean of ``pref/chosen_displacement`` is below −``DISPLACED_NATS``."""
    from keel._core import keys
    from keel.harness.scenarios.rl._lm import trailing_mean

    drift = trailing_mean(trace.series(keys.PREF_CHOSEN_DISPLACEMENT), DISPLACED_WINDOW)
    return next((i for i, d in enumerate(drift) if d < -DISPLACED_NATS), None)
