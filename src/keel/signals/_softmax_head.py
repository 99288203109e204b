"""Is the module the output-logit probe found the softmax output layer of a classifier? What the probe can know.

log Z, softmax collapse and the zero-loss fraction exist only for logits that a softmax turns into class
probabilities. A regressor's output, a one-logit sigmoid classifier, a multi-label sigmoid head or an inner
layer that merely happens to be the last ``nn.Linear`` registered have none: over one value a softmax is
always exactly one-hot (a "100 % collapse" that rolled a healthy regressor back every other step), and a
regressor's output drifting towards its targets is no "log Z drift". The probe therefore measures a head
only once it knows it is a softmax head:

- **More than one value per row.** The last dimension is the class dimension; size 1 is never a softmax.
- **A head it can trust by name**: the one named with ``OutputLogitsConfig.module``, Hugging Face's
  ``get_output_embeddings()`` (a language-model head over the vocabulary) or a module named ``lm_head``.
- **Otherwise both of**:

  1. *It is the model's output.* Its output tensor (or a view of it) is what the model returns: the tensor
     itself, an element of a returned tuple/list, a value of a returned dict or Hugging Face ``ModelOutput``,
     or a ``.logits`` attribute. A last ``nn.Linear`` whose output a pooler, a norm or an activation
     transforms first is an inner layer.
  2. *The loss sees it through a softmax*: integer class targets were given (`set_targets`, or ``labels=``
     of integer dtype), or the gradient of the loss with respect to the head's output sums to zero over
     each row. A loss that depends on z only through softmax(z) (cross-entropy, with label smoothing or soft
     targets, focal loss, distillation KL) is unchanged when a constant is added to a row, so its gradient
     is orthogonal to the all-ones vector; a squared error or a sigmoid loss is not. The test is
     Σ_rows |Σ_j g_ij| ≤ ``TOLERANCE`` · Σ |g| (cross-entropy gives ~1e-7 in float32 and ≤ 5e-3 computed in
     bfloat16 at initialisation; a squared error over k outputs gives ~1/√k for zero-mean residuals).
     One passing step is enough (rounding never makes a non-softmax loss shift-invariant); ``TRIES``
     failing steps with a non-zero, finite gradient settle it the other way. A z-loss term of 1e-4 stays
     far inside the tolerance. Logit soft-capping (tanh) breaks the invariance: such a head needs
     ``module=`` to be measured.

The gradient test hooks the head output's gradient on the steps until it is decided (normally the first),
one pass over that gradient and one host read each; later steps pay nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

TOLERANCE = 1e-2
TRIES = 3
# Hugging Face causal language models shift labels by one inside their loss; masked-LM and token-classification
# heads do not. Their class names say which (GPT2LMHeadModel, LlamaForCausalLM, ...).
_CAUSAL_LM_CLASS = re.compile(r"CausalLM|LMHeadModel")

CLASSIFIER = "a softmax classifier head"
CHECKING = "checking whether the head feeds a softmax"


def trusted_head(model: nn.Module, name: str, head: nn.Module, named: bool) -> bool:
    """The head is a softmax head by construction: named by the user, the output embeddings, or ``lm_head``."""
    if named or name.rsplit(".", 1)[-1] == "lm_head":
        return True
    get = getattr(model, "get_output_embeddings", None)
    try:
        return callable(get) and get() is head
    except Exception:  # a model whose get_output_embeddings raises (not implemented) has none
        return False


def shifts_labels(model: nn.Module) -> bool:
    """Hugging Face ``labels=`` are the next tokens (shifted inside the loss) for causal language models only."""
    return bool(_CAUSAL_LM_CLASS.search(type(model).__name__))


def output_tensors(out: Any) -> list[Tensor]:
    """The tensors a model returned: itself, tuple/list elements, dict/ModelOutput values, a ``.logits`` attribute."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        values: Any = out.values()
    elif isinstance(out, tuple | list):
        values = out
    else:
        values = [getattr(out, "logits", None)]
    return [v for v in values if isinstance(v, Tensor)]


def storage_id(t: Tensor) -> int | None:
    """Address of a tensor's storage (views share it); None where there is none (meta, some subclasses)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:
        return None
    return ptr or None


class SoftmaxHeadCheck:
    """The state of the decision for one head: what is known, and why it is not measured when it is not.

    Attributes:
        status: `CLASSIFIER`, `CHECKING`, or the reason the head is not measured.
    """

    def __init__(self, *, trusted: bool, head_is_model: bool) -> None:
        self.reaches_output: bool | None = True if trusted or head_is_model else None
        self.softmax: bool | None = True if trusted else None
        self._rejected: str | None = None
        self._head_storage: int | None = None
        self._num: Tensor | None = None
        self._den: Tensor | None = None
        self._fails = 0

    @property
    def status(self) -> str:
        if self._rejected is not None:
            return self._rejected
        return CLASSIFIER if self.reaches_output and self.softmax else CHECKING

    @property
    def rejected(self) -> bool:
        return self._rejected is not None

    @property
    def settled(self) -> bool:
        """The head is known to be a softmax classifier's: measuring it needs no more evidence."""
        return self._rejected is None and bool(self.reaches_output and self.softmax)

    def reject(self, reason: str) -> None:
        self._rejected = reason

    # --- evidence, from the hooks ------------------------------------------------------------------------
    def saw_head_output(self, logits: Tensor, class_targets: bool) -> None:
        """Called in the head's forward hook with its (floating, ≥ 2 classes) output."""
        if class_targets:
            self.softmax = True
        if self.softmax is None and logits.requires_grad:
            logits.register_hook(self._gradient)
        if self.reaches_output is None:
            self._head_storage = storage_id(logits)

    def saw_model_output(self, out: Any) -> None:
        """Called in the model's forward hook: is the head's last output among what the model returned?"""
        head, self._head_storage = self._head_storage, None
        if self.reaches_output is not None or head is None:
            return
        self.reaches_output = any(storage_id(t) == head for t in output_tensors(out))
        if not self.reaches_output:
            self.reject("its output is not the model's output (an inner layer)")

    def _gradient(self, grad: Tensor) -> None:
        with torch.no_grad():
            g = grad.detach().float()
            num, den = g.sum(dim=-1).abs().sum(), g.abs().sum()
            self._num = num if self._num is None else self._num + num
            self._den = den if self._den is None else self._den + den

    # --- decision, at measure time -----------------------------------------------------------------------
    def decide(self) -> bool:
        """True when the head is measured; settles the gradient test from this step's evidence (one host read)."""
        if self._rejected is not None:
            return False
        if self.softmax is None and self._den is not None:
            num, den = torch.stack([self._num, self._den]).tolist()  # type: ignore[list-item]
            self._num = self._den = None
            if den > 0 and math.isfinite(num) and math.isfinite(den):  # a zero or non-finite gradient says nothing
                if num <= TOLERANCE * den:
                    self.softmax = True
                else:
                    self._fails += 1
                    if self._fails >= TRIES:
                        self.softmax = False
                        self.reject(
                            "the loss does not see its output through a softmax (the gradient's rows "
                            "do not sum to 0: a regression or sigmoid output)"
                        )
        return bool(self.reaches_output and self.softmax)
