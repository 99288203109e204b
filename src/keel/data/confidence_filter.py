"""ConfidenceDropFilter: which test samples may drive test-time adaptation — those the adapted model has not grown
less sure of than the original model was.

Entropy minimisation at test time (TENT) trains on the model's own predictions; over a long stream its mistakes feed
on themselves until the model collapses. Lee et al. ("Towards open-set test-time adaptation utilizing the wisdom of
crowds in entropy minimization", ICCV 2023, arXiv 2308.06879) observe that most samples grow more confident as
adaptation goes on, while the samples whose confidence *drops* are mostly wrong or open-set; they leave those out of
the adaptation loss. keel's form, for logits of the same batch from the adapted and the frozen original model:

    ŷ_i = argmax_c p⁰_ic                                    (the original model's prediction)
    keep_i = p_i,ŷ − p⁰_i,ŷ ≥ margin   [and p⁰_i,ŷ ≥ min_confidence, when given: the open-set drop]

with p = softmax(adapted logits), p⁰ = softmax(original logits). Ties keep the sample (margin 0): at the first
step the two models agree and every sample is kept. The predicted class is the original model's, as in a public
reimplementation (ttavlm's ``OSTTA``, which also uses a margin, 0.05 for CLIP); the paper's wording ("confidence
lower under the adapted model") fits both models' classes when they agree. A −inf logit is a masked-out class
(probability 0: a head restricted to a label subset); a row with a NaN or +inf logit in either model, or with no
finite one, is dropped: nothing can be said of it.

Example:
    >>> import torch
    >>> original = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> adapted = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # more sure of sample 0, less of sample 1
    >>> ConfidenceDropFilter()(adapted, original)
    tensor([ True, False])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class ConfidenceDropFilter:
    """A mask over a batch: True for the samples whose confidence did not drop under adaptation.

    Use it inside a test-time adaptation step: ``loss = entropy[mask].mean()`` (and skip the update when the mask is
    empty, rather than adapting on what the filter rejected).

    Attributes:
        margin: The rise in confidence (probability of the original model's predicted class) a sample needs to be
            kept; 0 keeps every sample that did not drop, a positive margin keeps only those that rose by it.
        min_confidence: When set, also drop samples the original model gave less than this confidence (likely
            open-set: of no class it knows). In (0, 1].
    """

    margin: float = 0.0
    min_confidence: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not -1 < self.margin < 1:
            raise ValueError(f"ConfidenceDropFilter.margin={self.margin!r}; allowed: a number in (-1, 1)")
        value = self.min_confidence
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1
        ):
            raise ValueError(f"ConfidenceDropFilter.min_confidence={value!r}; allowed: None or a number in (0, 1]")

    def __call__(self, adapted_logits: torch.Tensor, original_logits: torch.Tensor) -> torch.Tensor:
        """The keep-mask of a batch.

        Args:
            adapted_logits: (batch, classes) logits of the model being adapted.
            original_logits: (batch, classes) logits of the frozen original model on the same samples.

        Returns:
            A bool tensor of shape (batch,), on the logits' device.

        Raises:
            ValueError: The logits are not two (batch, classes) tensors of the same shape.
        """
        return confidence_drop_mask(
            adapted_logits, original_logits, margin=self.margin, min_confidence=self.min_confidence
        )


def confidence_drop_mask(
    adapted_logits: torch.Tensor,
    original_logits: torch.Tensor,
    *,
    margin: float = 0.0,
    min_confidence: float | None = None,
) -> torch.Tensor:
    """The pure function behind `ConfidenceDropFilter` (the module's formula); computed in float32 or wider."""
    if (
        not isinstance(adapted_logits, torch.Tensor)
        or not isinstance(original_logits, torch.Tensor)
        or adapted_logits.ndim != 2
        or adapted_logits.shape != original_logits.shape
        or adapted_logits.shape[1] == 0
    ):
        shapes = [
            tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            for t in (adapted_logits, original_logits)
        ]
        raise ValueError(
            f"confidence_drop_mask: logits of shapes {shapes[0]} and {shapes[1]}; allowed: two (batch, classes) "
            "tensors of the same shape, classes >= 1"
        )
    dtype = torch.promote_types(adapted_logits.dtype, torch.float32)
    with torch.no_grad():
        adapted, original = adapted_logits.detach().to(dtype), original_logits.detach().to(dtype)
        finite = _usable_rows(adapted) & _usable_rows(original)
        p_original = original.softmax(dim=1)
        confidence0, predicted = p_original.max(dim=1)
        confidence = adapted.softmax(dim=1).gather(1, predicted[:, None]).squeeze(1)
        keep = finite & (confidence - confidence0 >= margin)
        if min_confidence is not None:
            keep &= confidence0 >= min_confidence
    return keep


def _usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows whose softmax is defined: no NaN or +inf, and at least one finite logit (−inf masks a class)."""
    return ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=1) & torch.isfinite(logits).any(dim=1)


__all__ = ["ConfidenceDropFilter", "confidence_drop_mask"]
