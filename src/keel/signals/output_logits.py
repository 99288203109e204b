"""Output-logit probe: log-partition log Z, logit scale, softmax-collapse and zero-loss fractions.

| key                       | cadence             | cost                                                     |
|---------------------------|---------------------|----------------------------------------------------------|
| `logits/log_z`            | every `every` steps | one exp pass over the output logits, in the head's hook  |
| `logits/log_z_max`, `logits/log_z_min` | as above | free (same pass)                                     |
| `logits/rms`, `logits/mean` | as above          | one square-sum and one sum pass                          |
| `logits/softmax_collapse` | as above            | free for float32 logits; else one exp pass in `precision` |
| `logits/zero_loss`        | as above, when targets are known | one gather                                  |
| (none of them)            | never, where the output is no softmax over ≥ 2 classes | the first step's check |

log Z drifting far from 0 is Wortsman et al.'s (2023) "output-logit divergence", which a z-loss of 1e-4
prevents (PaLM); the mean logit tracks the drift of the mean output embedding that Stollenwerk et al.
(2026, arXiv 2601.02031) identify as its cause. The softmax-collapse fraction (S = Σ exp(z − max z) == 1 in
the working precision) and the zero-loss fraction come from Prieto et al. (2025): once rows collapse, their
gradients vanish and the weights only grow along the naïve-loss-minimisation direction. The zero-loss fraction
needs the targets: Hugging Face models pass ``labels=`` to ``forward`` and are read automatically (shifted by
one for causal language models, as their loss does; -100 is ignored); other loops call
`OutputLogitsProbe.set_targets` before the forward pass, or go without that key.

Which models it measures (`keel.signals._softmax_head` has the details): only a softmax classifier's output
layer, with more than one class. A regressor, a one-logit sigmoid classifier, a multi-label sigmoid head or
an inner layer gives no keys at all — over one value a softmax is always "collapsed", and a regression
output drifting towards its targets is no log Z drift. A head named with ``module=``, Hugging Face's output
embeddings and a module named ``lm_head`` are taken as softmax heads; any other head found (``head``,
``output``, the last ``nn.Linear``) is measured once its output is seen to be the model's output and the
loss to see it through a softmax (integer class targets, or a gradient whose rows sum to 0 — checked on the
first step, one extra pass and one host read). ``OutputLogitsProbe.status`` says which, and why not.
Only floating-point logits are measured; targets outside ``[0, classes)`` count as ignored. Under autocast the
collapse fractions are judged in float32 (``precision``) and the hook's reductions run with autocast off, so CPU
and CUDA agree.

Under ``torch.compile`` the hook is traced into the model's graph. The check above needs a gradient hook that
keeps Python state and the output's storage address, which dynamo cannot trace (the forward would break into
several graphs, and ``fullgraph=True`` would raise), so a compiled head that still needs checking is not measured
(`COMPILED_UNCHECKED`); a head trusted by name — ``module=``, ``lm_head``, Hugging Face's output embeddings —
is measured inside the graph.

References:
    Wortsman et al. 2023, arXiv 2309.14322 (no official code); OLMo-core ``Z loss`` metrics.
    Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697; code
    github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability (``logger.py``).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from
from keel.losses.z_loss import log_partition
from keel.signals._hooks import (
    ObserverHook,
    add_count,
    compiling,
    find_output_head,
    named_modules_by_name,
    observing,
)
from keel.signals._softmax_head import CHECKING, SoftmaxHeadCheck, shifts_labels, trusted_head
from keel.signals.attn_logits import due
from keel.signals.norms import accumulation_dtype
from keel.signals.probe import Measurements, StepContext
from keel.signals.registry import PROBES

COMPILED_UNCHECKED = (
    "not measured under torch.compile: checking that a head found by position feeds a softmax "
    "would break the graph; name it with OutputLogitsConfig(module=...) to measure it"
)

_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(kw_only=True)
class OutputLogitsConfig:
    """Settings of the output-logit probe.

    Attributes:
        every: Cadence in steps (2 by default: log Z and collapse move over tens of steps, and the exp pass
            over the vocabulary is the probe's main cost).
        module: Name of the module whose output is the logits; ``None`` finds it (`find_output_head`).
        precision: The softmax's working precision for the collapse fractions (``"float32"``, ...);
            ``None``: the logits' own dtype, or float32 under autocast (which computes cross-entropy and
            log-softmax in float32 whatever the logits' dtype).
    """

    every: int = 2
    module: str | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"OutputLogitsConfig.every={self.every!r}; allowed: an int >= 1")
        if self.precision is not None and self.precision not in _PRECISIONS:
            raise ValueError(
                f"OutputLogitsConfig.precision={self.precision!r}; allowed: None, {', '.join(_PRECISIONS)}"
            )


class _Sums:
    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}
        self.counts: dict[str, int | Tensor] = {}

    def count(self, name: str, n: int, like: Tensor) -> None:
        self.counts[name] = add_count(self.counts.get(name), n, like)  # a tensor under torch.compile

    def add(self, name: str, value: Tensor, reduce: str = "sum") -> None:
        old = self.values.get(name)
        if old is None:
            self.values[name] = value
        elif reduce == "max":
            self.values[name] = torch.maximum(old, value)
        elif reduce == "min":
            self.values[name] = torch.minimum(old, value)
        else:
            self.values[name] = old + value


@PROBES.register("output_logits")
class OutputLogitsProbe:
    """Reduces the output logits inside the head's forward hook; keeps no activation.

    Example:
        >>> from keel.proxy import create_proxy_model
        >>> model = create_proxy_model("tiny")
        >>> probe = OutputLogitsProbe()
        >>> probe.attach(model)
        >>> idx = torch.zeros(1, 8, dtype=torch.long)
        >>> torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        >>> sorted(probe.read())  # the loss saw the head through a softmax: a classifier head
        ['logits/log_z', 'logits/log_z_max', 'logits/log_z_min', 'logits/mean', 'logits/rms', 'logits/softmax_collapse']
        >>> probe.detach()
    """

    name = "output_logits"

    def __init__(self, config: OutputLogitsConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, OutputLogitsConfig, config, fields)
        self._handles: list[Any] = []
        self._armed = False
        self._sums = _Sums()
        self._targets: Tensor | None = None
        self._shift = False
        self._causal_lm = False
        self._check: SoftmaxHeadCheck | None = None
        self._error: Exception | None = None
        self._compiled_unchecked = False  # a traced forward found the head still to be checked
        self.head: str | None = None

    @property
    def status(self) -> str:
        """Whether the head is measured (``"a softmax classifier head"``), still being checked, or why not."""
        if self._check is None:
            return "no output head found"
        if self._compiled_unchecked and self._check.status == CHECKING:
            return COMPILED_UNCHECKED
        return self._check.status

    # --- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        found = named_modules_by_name(model, [self.config.module])[0] if self.config.module else find_output_head(model)
        if found is None:
            warnings.warn(
                f"{self.name}: no output head found in {type(model).__name__}; pass module=...",
                KeelWarning,
                stacklevel=2,
            )
            return
        self.head, head = found
        self._check = SoftmaxHeadCheck(
            trusted=trusted_head(model, self.head, head, bool(self.config.module)), head_is_model=head is model
        )
        self._causal_lm = shifts_labels(model)
        self._handles = [
            head.register_forward_hook(ObserverHook(self._hook)),
            model.register_forward_pre_hook(ObserverHook(self._labels_hook), with_kwargs=True),
        ]
        if head is not model:
            self._handles.append(model.register_forward_hook(ObserverHook(self._model_hook)))
        self._armed = due(0, self.config.every)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_targets(self, targets: Tensor) -> None:
        """Targets of the next forward pass (class indices, the logits' shape without the class dimension)."""
        self._targets, self._shift = targets, False

    # --- hooks -------------------------------------------------------------------------------------------
    def _labels_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor):
            self._targets, self._shift = labels, self._causal_lm  # a causal LM predicts token t+1

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        targets, self._targets = self._targets, None
        check = self._check
        if check is not None and compiling() and not check.settled:  # cannot be traced: see the module docstring
            self._compiled_unchecked = True  # tested first: reading the cadence would compile a 2nd graph for nothing
            return
        if check is None or check.rejected or not (self._armed and observing(module)):
            return
        try:  # a hook runs inside the user's forward: never break it; `read` reports the error
            logits = _first_tensor(output)
            if logits is None or not logits.is_floating_point() or logits.dim() < 1 or logits.numel() == 0:
                return
            if logits.shape[-1] == 1:
                check.reject(
                    "it has one output per row (a regressor or a one-logit classifier): a softmax over "
                    "one value is always exactly one-hot"
                )
                return
            # class indices, one per row: integer (not bool: a multi-label mask) and the logits' shape without classes
            class_targets = (
                targets is not None
                and targets.shape == logits.shape[:-1]
                and targets.dtype != torch.bool
                and not targets.is_floating_point()
                and not targets.is_complex()
            )
            check.saw_head_output(logits, class_targets)
            # Under autocast the reductions run with it off: CUDA's autocast would sum the exp pass in float32
            # and blur the working precision (CPU's would not), so the two devices would disagree
            autocast = _autocast_on(logits.device.type)
            with torch.no_grad(), torch.autocast(logits.device.type, enabled=False) if autocast else nullcontext():
                self._reduce(logits.detach(), targets if class_targets else None, autocast)
        except Exception as exc:
            self._error = exc

    def _model_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._check is not None and observing(module):
            try:
                self._check.saw_model_output(output)
            except Exception as exc:
                self._error = exc

    def _reduce(self, z: Tensor, targets: Tensor | None, autocast: bool = False) -> None:
        if self.config.precision:
            precision = _PRECISIONS[self.config.precision]
        else:  # autocast computes cross-entropy and log-softmax in float32 on every device: that softmax collapses
            precision = torch.promote_types(z.dtype, torch.float32) if autocast else z.dtype
        zp = z.to(precision)
        top = zp.amax(dim=-1, keepdim=True)
        s = (zp - top).exp_().sum(dim=-1)  # in the working precision
        collapsed = s == 1
        if precision in (torch.float32, torch.float64) and z.dtype == precision:
            # log Z = max + log Σ exp(z − max): the collapse pass already holds both, no second exp pass
            log_z = top.squeeze(-1).float() + torch.log(s.float())
        else:  # S was summed in a lower precision than log Z wants: keel.losses.log_partition, in float32
            log_z = log_partition(z.float())
        sums = self._sums
        sums.add("log_z", log_z.sum())
        sums.add("log_z_max", log_z.amax(), "max")
        sums.add("log_z_min", log_z.amin(), "min")
        sums.add("square", torch.linalg.vector_norm(z, dtype=accumulation_dtype(z.dtype)).square().float())
        sums.add("sum", z.sum(dtype=torch.float32))
        sums.add("collapsed", collapsed.sum(dtype=torch.float32))
        sums.count("rows", log_z.numel(), log_z)  # host-side counts in eager: no tensor to create
        sums.count("elements", z.numel(), log_z)
        if targets is not None:
            y, keep_top, keep_s = targets, top.squeeze(-1), s
            if self._shift:
                y, zp, keep_top, keep_s = y[..., 1:], zp[..., :-1, :], keep_top[..., :-1], keep_s[..., :-1]
            if y.shape == zp.shape[:-1]:
                # -100 and any other index outside [0, classes) (segmentation's 255) is an ignored row
                valid = (y >= 0) & (y < zp.shape[-1])
                at_target = zp.gather(-1, y.long().clamp(0, zp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
                zero = (keep_s == 1) & (at_target == keep_top) & valid
                sums.add("zero", zero.sum(dtype=torch.float32))
                sums.add("target_rows", valid.sum(dtype=torch.float32))

    # --- measure -----------------------------------------------------------------------------------------
    def read(self) -> Measurements:
        """This step's values (what `measure` returns), then starts a new step."""
        v, n, self._sums = self._sums.values, self._sums.counts, _Sums()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"output-logit hook failed: {error!r}") from error
        if "rows" not in n or self._check is None or not self._check.decide():
            return {}
        out: Measurements = {
            keys.LOGITS_LOG_Z: v["log_z"] / n["rows"],
            keys.LOGITS_LOG_Z_MAX: v["log_z_max"],
            keys.LOGITS_LOG_Z_MIN: v["log_z_min"],
            keys.LOGITS_RMS: (v["square"] / n["elements"]).sqrt(),
            keys.LOGITS_MEAN: v["sum"] / n["elements"],
            keys.LOGITS_SOFTMAX_COLLAPSE: v["collapsed"] / n["rows"],
        }
        if "zero" in v:
            out[keys.LOGITS_ZERO_LOSS] = v["zero"] / v["target_rows"]
        return out

    def measure(self, ctx: StepContext) -> Measurements:
        out = self.read()
        self._armed = due(ctx.step + 1, self.config.every)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}


def _autocast_on(device_type: str) -> bool:
    """Is autocast enabled for this device type here (inside the forward pass the hook runs in)?"""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _first_tensor(output: Any) -> Tensor | None:
    """The head's output tensor: itself, or the first tensor of a tuple/list it returned."""
    if isinstance(output, Tensor):
        return output
    return next((o for o in output if isinstance(o, Tensor)), None) if isinstance(output, tuple | list) else None
