"""CHES, the centered hidden-embedding similarity of a preference pair: a predictor of DPO likelihood displacement.

From Razin et al. (2025), "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
(ICLR 2025, arXiv 2410.08847), official code princeton-nlp/unintentional-unalignment ``ches/ches.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TokenIds = Sequence[int] | Tensor


def ches_score(
    h_chosen: Tensor,
    h_rejected: Tensor,
    *,
    mask_chosen: Tensor | None = None,
    mask_rejected: Tensor | None = None,
    length_normalize: bool = False,
) -> Tensor:
    """CHES of each pair from hidden states: ``⟨Σh⁺, Σh⁻⟩ − ‖Σh⁺‖²``, or with means for the length-normalised form.

    h⁺ₖ is the model's last-layer hidden state at the position that *predicts* token k of the chosen response
    (from the last prompt token to the second-to-last response token), h⁻ₖ the same for the rejected one. A
    high score means the model embeds the two responses alike, so DPO's push down on y⁻ also pushes y⁺ down:
    the pairs with the highest CHES are the ones that displace log π(y⁺|x) (Razin et al., Thm. 5, §5).
    Length-normalised: ``⟨Σh⁺, Σh⁻⟩ / (|y⁺|·|y⁻|) − ‖Σh⁺‖² / |y⁺|²``. Use `ches_scores` to get the hidden
    states from a model.

    Half precision is computed in float32, float64 stays float64. NaN/±Inf hidden states propagate to their
    pair's score (`keel.data.filter_preference_pairs` then refuses them).

    Args:
        h_chosen: ``(pairs, positions, hidden)`` hidden states for the chosen responses.
        h_rejected: ``(pairs, positions', hidden)`` for the rejected ones (the position count may differ).
        mask_chosen: Optional ``(pairs, positions)`` bool or 0/1 tensor, True for real (not padding) positions.
        mask_rejected: Optional ``(pairs, positions')``, likewise.
        length_normalize: The length-normalised form (the one the paper's filtering recipe ranks by).

    Returns:
        ``(pairs,)`` scores.

    Raises:
        ValueError: non-floating or non-3-d hidden states, pair or hidden sizes that differ, a mask of the
            wrong shape, no pairs, or a pair whose mask selects no position (an empty response has no CHES).

    Example:
        >>> h_pos = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # Σh⁺ = (1, 2)
        >>> h_neg = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]])  # Σh⁻ = (3, 2)
        >>> ches_score(h_pos, h_neg)  # (3 + 4) − (1 + 4)
        tensor([2.])
        >>> ches_score(h_pos, h_neg, length_normalize=True)  # 7 / (2·3) − 5 / 2²
        tensor([-0.0833])

    References:
        Razin et al. (2025), arXiv 2410.08847, Def. 2 (CHES) and §6 (filtering);
        princeton-nlp/unintentional-unalignment ``ches/ches.py::compute_ches_scores``.
    """
    for name, h in (("h_chosen", h_chosen), ("h_rejected", h_rejected)):
        if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() != 3:
            got = f"shape {tuple(h.shape)}, {h.dtype}" if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"{name}: {got}; allowed: a floating (pairs, positions, hidden) tensor")
    if h_chosen.shape[0] != h_rejected.shape[0] or h_chosen.shape[2] != h_rejected.shape[2]:
        raise ValueError(
            f"h_rejected.shape={tuple(h_rejected.shape)}; allowed: the pairs and hidden sizes of "
            f"h_chosen.shape={tuple(h_chosen.shape)}"
        )
    if h_chosen.shape[0] == 0:
        raise ValueError("h_chosen has 0 pairs; allowed: at least one pair")
    dtype = torch.float64 if torch.float64 in (h_chosen.dtype, h_rejected.dtype) else torch.float32
    sum_pos, n_pos = _masked_sum("chosen", h_chosen.to(dtype), mask_chosen)
    sum_neg, n_neg = _masked_sum("rejected", h_rejected.to(dtype), mask_rejected)
    cross = (sum_pos * sum_neg).sum(dim=-1)
    own = sum_pos.square().sum(dim=-1)
    if length_normalize:
        return cross / (n_pos * n_neg) - own / n_pos.square()
    return cross - own


def _masked_sum(which: str, h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Σ over selected positions ``(pairs, hidden)``, number of selected positions ``(pairs,)``)."""
    if mask is None:
        if h.shape[1] == 0:
            raise ValueError(f"h_{which} has 0 positions; allowed: at least one response position per pair")
        return h.sum(dim=1), torch.full(h.shape[:1], float(h.shape[1]), dtype=h.dtype, device=h.device)
    if not isinstance(mask, Tensor) or mask.shape != h.shape[:2]:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask_{which}: {got}; allowed: a tensor of h_{which}'s (pairs, positions) {tuple(h.shape[:2])}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    counts = keep.sum(dim=1)
    empty = (counts == 0).nonzero()
    if len(empty):  # one host sync: CHES is an offline data audit, not a per-step signal
        raise ValueError(f"mask_{which} selects no position for pair {int(empty[0])}; allowed: >= 1 per pair")
    # masked_fill, not multiply: NaN padding must not leak into the sum
    return h.masked_fill(~keep[..., None], 0.0).sum(dim=1), counts.to(h.dtype)


@torch.no_grad()
def ches_scores(
    model: Any,
    prompts: Sequence[TokenIds] | Tensor,
    chosen: Sequence[TokenIds] | Tensor,
    rejected: Sequence[TokenIds] | Tensor,
    *,
    length_normalize: bool = False,
    batch_size: int = 16,
) -> Tensor:
    """CHES of each (prompt, chosen, rejected) triple of token ids, from a Hugging Face causal LM.

    Runs ``model(input_ids, attention_mask, output_hidden_states=True)`` on prompt + response (right-padded,
    so every real token keeps its position), takes the last layer's hidden states at the positions from the
    last prompt token to the second-to-last response token — the R states that predict the R response tokens
    (EOS included); the state at the final token itself predicts nothing in the response and is left out, as in
    the official ``ches/ches.py`` — and scores them with `ches_score`. (The
    official per-example script ``compute_preference_similarity_per_example.py`` keeps the final position too;
    keel follows ``ches.py``.) Append EOS to the responses yourself if your trainer does (TRL's DPO does).

    The model runs in eval mode (dropout off) without gradients; its training flag is restored afterwards.

    Args:
        model: A causal LM whose output has ``hidden_states`` (e.g. ``transformers.AutoModelForCausalLM``).
        prompts: Token ids per pair (lists of ints or 1-d integer tensors), each non-empty.
        chosen: Chosen-response token ids per pair, each non-empty.
        rejected: Rejected-response token ids per pair, each non-empty.
        length_normalize: Score with the length-normalised form.
        batch_size: Pairs per forward pass, an int >= 1.

    Returns:
        ``(pairs,)`` float32 scores on the CPU (float64 for a float64 model).

    Raises:
        ValueError: sequences of different lengths or none, an empty prompt or response, ids that are not
            integers, a bad ``batch_size``, or a model output without ``hidden_states``.

    Example:
        >>> from types import SimpleNamespace
        >>> class Echo(torch.nn.Module):  # hidden state = (token id, 1): a stand-in for a causal LM
        ...     def forward(self, input_ids, attention_mask, output_hidden_states):
        ...         h = torch.stack([input_ids.float(), torch.ones_like(input_ids).float()], dim=-1)
        ...         return SimpleNamespace(hidden_states=(h,))
        >>> ches_scores(Echo(), [[5, 1]], [[2, 9]], [[3, 9]])  # Σh⁺ = (1+2, 2), Σh⁻ = (1+3, 2): 16 − 13
        tensor([3.])

    References:
        Razin et al. (2025), arXiv 2410.08847; princeton-nlp/unintentional-unalignment ``ches/ches.py``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: an int >= 1")
    if not (len(prompts) == len(chosen) == len(rejected)) or len(prompts) == 0:  # `not` fails on a 2-d tensor
        raise ValueError(
            f"len(prompts)={len(prompts)}, len(chosen)={len(chosen)}, len(rejected)={len(rejected)}; "
            "allowed: the same number (>= 1) of each"
        )
    prompt_ids = [_ids("prompts", i, p) for i, p in enumerate(prompts)]
    chosen_ids = [_ids("chosen", i, c) for i, c in enumerate(chosen)]
    rejected_ids = [_ids("rejected", i, r) for i, r in enumerate(rejected)]
    device = _device(model)
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        scores = []
        for start in range(0, len(prompt_ids), batch_size):
            window = slice(start, start + batch_size)
            h_pos, m_pos = _response_states(model, prompt_ids[window], chosen_ids[window], device)
            h_neg, m_neg = _response_states(model, prompt_ids[window], rejected_ids[window], device)
            score = ches_score(h_pos, h_neg, mask_chosen=m_pos, mask_rejected=m_neg, length_normalize=length_normalize)
            scores.append(score.cpu())
    finally:
        if was_training and isinstance(model, torch.nn.Module):
            model.train()
    return torch.cat(scores)


def _device(model: Any) -> torch.device | None:
    """The device of the model's first parameter; None (leave inputs on the CPU) for a model without any."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    first = next(parameters, None)
    return None if first is None else first.device


def _ids(name: str, index: int, ids: object) -> list[int]:
    values = ids.tolist() if isinstance(ids, Tensor) and ids.dim() == 1 and not ids.is_floating_point() else ids
    if not isinstance(values, Sequence) or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ValueError(f"{name}[{index}]={ids!r}; allowed: a sequence of int token ids or a 1-d integer tensor")
    if not values:
        raise ValueError(f"{name}[{index}] is empty; allowed: at least one token")
    return list(values)


def _response_states(
    model: Any, prompts: list[list[int]], responses: list[list[int]], device: torch.device | None
) -> tuple[Tensor, Tensor]:
    """Last-layer states ``(pairs, max response length, hidden)`` at the positions predicting each response
    token, and their mask."""
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)  # pad id 0: masked out, never read
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden_states = getattr(output, "hidden_states", None)
    if not hidden_states:
        raise ValueError(
            f"the model's output ({type(output).__name__}) has no hidden_states; allowed: a causal LM that returns "
            "them for output_hidden_states=True (e.g. a transformers AutoModelForCausalLM)"
        )
    last = hidden_states[-1]  # (pairs, width, hidden)
    longest = max(len(r) for r in responses)
    # position predicting response token k is len(prompt) − 1 + k
    offsets = torch.arange(longest)
    starts = torch.tensor([len(p) - 1 for p in prompts])
    lengths = torch.tensor([len(r) for r in responses])
    mask = offsets[None, :] < lengths[:, None]  # (pairs, longest)
    index = torch.where(mask, starts[:, None] + offsets[None, :], 0).to(last.device)
    gathered = last.gather(1, index[..., None].expand(-1, -1, last.shape[-1]))
    return gathered, mask.to(last.device)
