"""The loop's own RL signals for `keel bench overhead --signals`: what a preference or policy-gradient loop adds to
``Guard.step`` — its ``signals=`` dict and the detectors that read it.

Each step the variant computes a typical dict with keel's own functions, from tensors of the batch's shape (B
sequences of T tokens; fixed synthetic values drawn once from a generator of their own, so the model's weights
and batches stay those of the other variants), and hands it to ``guard.step(loss, signals=...)``; its `Guard`
runs the preset a TRL trainer gets from `keel.integrations.trl.guard_trainer`:

- ``pref``: ``preference_signals`` of B pairs with the reference's log-probabilities and token counts (9 keys),
  detectors ``default_detectors() + preference_detectors()``;
- ``rl``: ``policy_signals`` of B responses (entropies, log-probabilities under the policy, the reference and the
  sampling policy, per-response advantages, rewards in groups, lengths) and ``reward_ensemble_signals`` of a
  4-member ensemble (19 keys), detectors ``default_detectors() + policy_detectors()``.

So the variant's ratio to ``default`` is the whole cost of the RL configuration: computing the dict, checking it,
its values riding in the step's host copy, the extra detectors and the extra columns in the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from keel.detect import Detector, default_detectors, policy_detectors, preference_detectors
from keel.signals import policy_signals, preference_signals, reward_ensemble_signals

SignalKind = Literal["pref", "rl"]
KINDS: tuple[SignalKind, ...] = ("pref", "rl")
ENSEMBLE = 4  # reward models in the ensemble


def rl_signal_source(
    kind: SignalKind, batch_size: int, seq_len: int, device: str = "cpu"
) -> tuple[list[Detector], Callable[[], dict[str, Tensor]]]:
    """The detectors of a ``kind`` loop's Guard and a function making its ``signals=`` dict for one step.

    Example:
        >>> detectors, signals = rl_signal_source("pref", batch_size=4, seq_len=8)
        >>> sorted(signals())[:3]
        ['pref/accuracy', 'pref/chosen_displacement', 'pref/chosen_logp']
    """
    gen = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    b, t = batch_size, seq_len
    if kind == "pref":
        logps = [draw(b) - 20.0 for _ in range(4)]  # chosen, rejected; their reference's
        tokens = torch.full((b,), float(t), device=device)

        def pref() -> dict[str, Tensor]:
            return preference_signals(
                logps[0],
                logps[1],
                ref_chosen_logps=logps[2],
                ref_rejected_logps=logps[3],
                beta=0.1,
                chosen_tokens=tokens,
                rejected_tokens=tokens,
            )

        return [*default_detectors(), *preference_detectors()], pref
    if kind == "rl":
        mask = draw(b, t) > -1.5  # ~93 % response tokens
        entropies, token_logps = draw(b, t).abs(), draw(b, t) - 2.0
        ref_logps, old_logps = token_logps + 0.01 * draw(b, t), token_logps + 0.01 * draw(b, t)
        advantages, rewards, ensemble = draw(b), draw(b), draw(ENSEMBLE, b)
        group = next((g for g in (8, 4, 2) if b % g == 0), None)

        def rl() -> dict[str, Tensor]:
            signals = policy_signals(
                mask=mask,
                entropies=entropies,
                logps=token_logps,
                ref_logps=ref_logps,
                old_logps=old_logps,
                advantages=advantages,
                epsilon_high=0.28,
                rewards=rewards,
                group_size=group,
                max_length=t,
            )
            return signals | reward_ensemble_signals(ensemble)

        return [*default_detectors(), *policy_detectors()], rl
    raise ValueError(f"signals kind {kind!r}; allowed: {', '.join(KINDS)}")
