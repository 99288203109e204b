"""Drop the preference pairs most likely to displace the chosen response's likelihood under DPO (highest CHES).

From Razin et al. (2025), "Unintentional Unalignment" (ICLR 2025, arXiv 2410.08847), §6 and the filtering
recipe in princeton-nlp/unintentional-unalignment ``README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keel.data.ches import ches_scores

# keel's default, not the paper's: drop the riskiest tenth and keep most of the data. The paper's SORRY-Bench
# recipe keeps only the 5% lowest-CHES pairs (keep_fraction=0.05), a deliberately extreme demonstration.
DEFAULT_DROP_FRACTION = 0.1
_PAIR_KEYS = ("prompt", "chosen", "rejected")
_ROUNDING = 1e-9  # n·fraction of 0.29·100 is 28.999999999999996: count it as 29


@dataclass(frozen=True, kw_only=True)
class DroppedPair:
    """One pair `filter_preference_pairs` dropped: its position in the input, its CHES score and the pair."""

    index: int
    score: float
    pair: Any


@dataclass(frozen=True, kw_only=True)
class PreferenceFilterResult:
    """What `filter_preference_pairs` returns.

    Attributes:
        kept: The kept pairs, in their input order (hand these to the trainer).
        kept_indices: Their positions in the input.
        dropped: The dropped pairs, highest score first.
        scores: Every pair's score, in input order.
        threshold: The lowest dropped score (pairs scoring above it were all dropped); None if none was dropped.
    """

    kept: list[Any]
    kept_indices: list[int]
    dropped: list[DroppedPair]
    scores: list[float]
    threshold: float | None


def filter_preference_pairs(
    pairs: Sequence[Any],
    *,
    scores: Tensor | Sequence[float] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    drop_fraction: float | None = None,
    keep_fraction: float | None = None,
    length_normalize: bool = True,
    add_eos: bool = True,
    batch_size: int = 16,
) -> PreferenceFilterResult:
    """Drop the highest-CHES preference pairs before DPO, and say which were dropped and why.

    Pairs whose chosen and rejected responses the model embeds alike (high CHES) are the ones for which DPO
    lowers log π(y⁺|x); Razin et al. restore the chosen likelihood by training without them. Give either the
    ``scores`` (e.g. from `keel.data.ches_scores`) or a ``model`` and ``tokenizer`` to compute them: then each
    pair must be a mapping with string ``"prompt"``, ``"chosen"`` and ``"rejected"`` (TRL's standard,
    non-conversational format), each is tokenized separately without special tokens and EOS is appended to the
    responses (as TRL's DPO does; ``add_eos=False`` to skip), and the length-normalised CHES ranks them, as the
    paper's recipe does. The alternative remedy, keeping every pair, is the SFT-on-chosen anchor
    (`keel.losses.chosen_sft_loss`).

    How many are dropped: ``floor(n · drop_fraction)``, or ``n − ceil(n · keep_fraction)``; by default 10% (keel's
    choice, see ``DEFAULT_DROP_FRACTION``). The paper keeps the lowest 5%: ``keep_fraction=0.05``. Ties at the
    threshold are broken by input order (the earlier pair is dropped first).

    Args:
        pairs: The preference pairs (any objects when ``scores`` is given).
        scores: One finite score per pair; higher means riskier.
        model: A Hugging Face causal LM, used with ``tokenizer`` when ``scores`` is None.
        tokenizer: Its tokenizer (called as ``tokenizer(text, add_special_tokens=False)["input_ids"]``).
        drop_fraction: Share of pairs to drop, in [0, 1].
        keep_fraction: Share to keep, in [0, 1]; give at most one of the two fractions.
        length_normalize: Rank by the length-normalised CHES (model path only).
        add_eos: Append ``tokenizer.eos_token_id`` to each response (model path only).
        batch_size: Pairs per forward pass (model path only).

    Returns:
        `PreferenceFilterResult`.

    Raises:
        ValueError: no pairs; both or neither of ``scores`` and ``model``; a model without tokenizer; a score
            count that differs from the pairs; a NaN or infinite score (named by index); both fractions, or
            one outside [0, 1]; a pair without the three string fields on the model path.

    Example:
        >>> pairs = ["a", "b", "c", "d"]
        >>> result = filter_preference_pairs(pairs, scores=[0.5, 3.0, -1.0, 2.0], drop_fraction=0.5)
        >>> result.kept, [(d.index, d.score) for d in result.dropped], result.threshold
        (['a', 'c'], [(1, 3.0), (3, 2.0)], 2.0)

    References:
        Razin et al. (2025), arXiv 2410.08847, §6; princeton-nlp/unintentional-unalignment ``README.md``.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"pairs={pairs!r:.80}; allowed: a non-empty sequence of preference pairs")
    n_drop = _drop_count(len(pairs), drop_fraction, keep_fraction)
    if (scores is None) == (model is None):
        raise ValueError("scores and model: give exactly one (scores to rank by, or a model and tokenizer)")
    if scores is None:
        if tokenizer is None:
            raise ValueError("tokenizer=None with a model; allowed: the model's tokenizer")
        scores = _model_scores(pairs, model, tokenizer, length_normalize, add_eos, batch_size)
    values = _checked_scores(scores, len(pairs))
    # highest first; Python's sort is stable, so equal scores keep input order
    ranked = sorted(range(len(pairs)), key=lambda i: -values[i])
    dropped_indices = ranked[:n_drop]
    dropped_set = set(dropped_indices)
    kept_indices = [i for i in range(len(pairs)) if i not in dropped_set]
    return PreferenceFilterResult(
        kept=[pairs[i] for i in kept_indices],
        kept_indices=kept_indices,
        dropped=[DroppedPair(index=i, score=values[i], pair=pairs[i]) for i in dropped_indices],
        scores=values,
        threshold=values[dropped_indices[-1]] if dropped_indices else None,
    )


def _drop_count(n: int, drop_fraction: object, keep_fraction: object) -> int:
    if drop_fraction is not None and keep_fraction is not None:
        raise ValueError(
            f"drop_fraction={drop_fraction!r} and keep_fraction={keep_fraction!r}; allowed: at most one of them"
        )
    for name, value in (("drop_fraction", drop_fraction), ("keep_fraction", keep_fraction)):
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        ):
            raise ValueError(f"{name}={value!r}; allowed: a number in [0, 1]")
    if keep_fraction is not None:
        return n - math.ceil(n * float(keep_fraction) - _ROUNDING)  # type: ignore[arg-type]
    fraction = DEFAULT_DROP_FRACTION if drop_fraction is None else float(drop_fraction)  # type: ignore[arg-type]
    return math.floor(n * fraction + _ROUNDING)


def _checked_scores(scores: Tensor | Sequence[float], n: int) -> list[float]:
    if isinstance(scores, Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores.shape={tuple(scores.shape)}; allowed: one score per pair, ({n},)")
        values = [float(x) for x in scores.detach().cpu().double().tolist()]
    else:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
            raise ValueError(f"scores={list(scores)!r:.80}; allowed: numbers, one per pair")
        values = [float(x) for x in scores]
    if len(values) != n:
        raise ValueError(f"len(scores)={len(values)}; allowed: one score per pair ({n})")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"scores[{i}]={value!r}; allowed: finite numbers (a NaN score cannot be ranked)")
    return values


def _model_scores(
    pairs: Sequence[Any], model: Any, tokenizer: Any, length_normalize: bool, add_eos: bool, batch_size: int
) -> Tensor:
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id; allowed: add_eos=False")
    columns: dict[str, list[list[int]]] = {key: [] for key in _PAIR_KEYS}
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Mapping) or not all(isinstance(pair.get(key), str) for key in _PAIR_KEYS):
            raise ValueError(
                f"pairs[{i}]={pair!r:.80}; allowed: a mapping with string 'prompt', 'chosen' and 'rejected'"
            )
        for key in _PAIR_KEYS:
            ids = list(tokenizer(pair[key], add_special_tokens=False)["input_ids"])
            columns[key].append(ids + [eos] if key != "prompt" and eos is not None else ids)
    return ches_scores(
        model,
        columns["prompt"],
        columns["chosen"],
        columns["rejected"],
        length_normalize=length_normalize,
        batch_size=batch_size,
    ).to(torch.float64)
