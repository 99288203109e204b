"""TRL adapter: `guard_trainer` puts a keel `Guard` in charge of an ``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``,
``GRPOTrainer``, ``RLOOTrainer`` or ``RewardTrainer`` (trl 1.16, ``pip install 'keel[trl]'``).

    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=pairs, processing_class=tok)
    guard_trainer(trainer, run_dir="runs/dpo", policy="skip")
    trainer.train()

It is the Hugging Face `KeelCallback` (same update hand-off, clipping and ``policy=`` semantics: ``"observe"``
is bit-identical to the bare trainer, ``"skip"`` and ``"recover"`` skip or roll back updates), plus what TRL needs:

- **the loss**: TRL's trainers compute their objective in ``compute_loss``; the model's own output loss there is
  the token NLL (DPO's fused head) or absent (a reward model), not the DPO, GRPO or reward loss — nor SFT's, which
  SFTTrainer normalises over the step's tokens (the fused head's loss is a per-micro-batch mean) and which is
  another objective under ``loss_type="dft"``, label smoothing or a router aux loss. The adapter wraps
  the trainer's ``compute_loss`` and hands keel the loss it returns — the value the Trainer logs as ``loss``
  (micro-batch losses averaged, or summed where TRL already normalised them over the step, as GRPO does).
- **TRL's statistics**: each step, the values the trainer appended to its ``_metrics["train"]`` (rewards,
  margins, log-probabilities, entropy, KL, clip ratios, completion lengths, …) go to ``Guard.step(signals=...)``
  under keel's keys (`keys.TRL_ALIASES`; the others as ``trl/<name>``, see `keel.integrations._trl_statistics`).
  They are read at the optimizer step, after the step's last ``compute_loss`` and before ``log()`` clears them,
  so every step is recorded whatever ``logging_steps`` is. keel recomputes none of them. A statistic that is not
  one real number is left out of that step and recorded once as a ``keel_error`` finding; training goes on.
- **GRPO/RLOO rollbacks**: ``GRPOTrainer`` (and ``RLOOTrainer``, built the same way) generates completions once
  per ``steps_per_generation × num_iterations`` micro-steps and reuses them from ``_buffered_inputs``. After a
  rollback those completions and their old log-probabilities belong to the weights that were rolled back, so the
  adapter **drops the buffer** (``_buffered_inputs = None``; TRL then generates afresh from the restored weights at
  the next micro-step, as it does on resume) and records the steps where it did in the run's ``trl`` meta entry.
  TRL's adaptive-entropy coefficient is not rolled back.
- **GRPO/RLOO weights after each update** (``policy="recover"``): the next thing to use the weights is TRL's
  generation, before keel's next step — an update that left a NaN/Inf weight made ``torch.multinomial`` raise there
  and end the run before keel could roll back (helper H's H7). The adapter checks that the weights are finite after
  each applied update (one ``foreach`` norm and one read), and when they are not it says so and lets the next
  micro-step train on the completions already buffered instead of generating from broken weights: that step's
  loss is then non-finite, keel finds the weights and rolls back, the buffer is dropped and TRL generates from the
  restored weights (`_FiniteWeights`).

Detectors, unless ``detectors=`` says otherwise: `Guard`'s defaults, plus `keel.detect.preference_detectors` for a
``DPOTrainer`` (likelihood displacement) or `keel.detect.policy_detectors` for a ``GRPOTrainer`` or ``RLOOTrainer``
(entropy collapse, KL blow-up, dead groups, …), which read TRL's statistics under keel's keys. For those two the
defaults that judge the loss's level (loss spike, divergence) are left out: their loss is a surrogate near 0 of
either sign (`_not_on_the_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.decision import Decision
from keel.detect import Detector, default_detectors, policy_detectors, preference_detectors
from keel.guard import Guard
from keel.integrations._run_length import say
from keel.integrations._trl_statistics import NewStatistics
from keel.recover import Policy

try:
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("keel.integrations.trl needs trl: pip install 'keel[trl]'") from exc

from keel.integrations.hf import KeelCallback, _json_args  # noqa: E402 (after the trl check: it needs transformers)

TRAINERS = (SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer, RLOOTrainer, RewardTrainer)
POLICY_GRADIENT = (GRPOTrainer, RLOOTrainer)  # same statistics, buffered completions and surrogate loss
META_KEY = "trl"  # the run's meta entry: which trainer, how statistics are named, GRPO buffer drops


def guard_trainer(
    trainer: Any,
    *,
    run_dir: str | None = None,
    policy: Policy = "observe",
    take_over_clipping: bool | None = None,
    **guard_kwargs: Any,
) -> KeelTRLCallback:
    """Guard a TRL trainer's updates with keel: call before ``trainer.train()``.

    Args:
        trainer: A ``trl.SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer`` or
            ``RewardTrainer``.
        run_dir: Directory of the run store; ``None`` keeps it in memory.
        policy: ``"observe"``, ``"skip"`` or ``"recover"`` (see `Guard`).
        take_over_clipping: As for `KeelCallback`: by default keel clips, except under ``"observe"``.
        **guard_kwargs: Any other `Guard` argument (``detectors``, ``probes``, ``recovery``, …).

    Returns:
        The callback, added to the trainer; its ``guard`` is the `Guard` once training has started.

    Raises:
        ValueError: ``trainer`` is not one of these TRL trainers, lacks TRL's ``_metrics``, or is guarded
            already; a `Guard` argument the trainer owns or `Guard` refuses.

    Example:
        >>> guard_trainer(object())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: guard_trainer(trainer=<object>): allowed: a trl SFTTrainer, DPOTrainer, ... or RewardTrainer
    """
    _check_trainer(trainer)
    callback = KeelTRLCallback(
        trainer, run_dir=run_dir, policy=policy, take_over_clipping=take_over_clipping, **guard_kwargs
    )
    trainer.add_callback(callback)
    _wrap_compute_loss(trainer, callback)
    return callback


class KeelTRLCallback(KeelCallback):
    """`KeelCallback` fed by a TRL trainer: its ``compute_loss`` loss and its own statistics. Build it with
    `guard_trainer`, which also wraps the trainer's ``compute_loss``."""

    def __init__(
        self,
        trainer: Any,
        *,
        run_dir: str | None = None,
        policy: Policy = "observe",
        take_over_clipping: bool | None = None,
        **guard_kwargs: Any,
    ) -> None:
        name = type(trainer).__name__
        guard_kwargs.setdefault("config", {"trainer": f"trl.{name}", "args": _json_args(trainer.args)})
        if "detectors" not in guard_kwargs and (preset := _detectors_for(trainer)) is not None:
            guard_kwargs["detectors"] = preset
        super().__init__(run_dir=run_dir, policy=policy, take_over_clipping=take_over_clipping, **guard_kwargs)
        self.trainer = trainer
        self._statistics = NewStatistics(trainer._metrics["train"])
        self._meta_written = False
        self._meta: dict[str, Any] = {"trainer": name, "statistics": "keys.TRL_ALIASES; others as trl/<name>"}
        if hasattr(trainer, "_buffered_inputs"):
            self._meta |= {"rollback": "drops GRPO's buffered completions (TRL regenerates)", "buffer_dropped_at": []}
        self._weights: _FiniteWeights | None = None
        if isinstance(trainer, POLICY_GRADIENT) and policy == "recover":
            self._weights = _FiniteWeights(trainer)

    def _build_guard(self, *, restarted: bool = False, continue_at: int | None = None) -> Guard:
        """The Guard, holding the reference model too when the trainer updates it during training: TR-DPO's
        ``sync_ref_model`` mixes it toward the policy every ``ref_model_sync_steps``, so a rollback that restored
        the policy alone left the reference holding the updates it undid (reviewer h26 V11). One copy of the
        reference more per snapshot."""
        guard = super()._build_guard(restarted=restarted, continue_at=continue_at)
        reference = getattr(self.trainer, "ref_model", None)
        if getattr(self.trainer.args, "sync_ref_model", False) and isinstance(reference, nn.Module):
            guard.track(reference, name="ref_model")
        return guard

    def _capture_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Nothing: under TRL the model's output loss is not the objective; `record_trainer_loss` is."""

    def record_trainer_loss(self, loss: Tensor, *, share: bool) -> None:
        """One micro-batch's loss from the trainer's ``compute_loss`` (``share``: already a share of the step's
        total, which the Trainer then logs summed)."""
        self._loss.add(loss, share=share)

    def _step_guard(self, loss: Tensor, grad_norm: Tensor | float | None = None) -> Decision:
        guard = self.guard
        assert guard is not None
        signals: dict[str, float] = {}
        try:
            found = self._statistics.take()
            signals = found.values
            for name, problem in found.problems.items():
                guard.components.fail(
                    f"trl:{name}", guard.global_step, ValueError(f"TRL statistic {name!r}: {problem}")
                )
            if not self._meta_written:
                guard.recorder.meta({META_KEY: self._meta})
                self._meta_written = True
        except Exception as exc:  # keel's bookkeeping never stops training: this step goes on without them
            guard.components.fail("trl", guard.global_step, exc, disable=False)
        decision = guard.step(loss, grad_norm=grad_norm, signals=signals)
        if decision.action == "rollback" and "buffer_dropped_at" in self._meta:
            self.trainer._buffered_inputs = None  # its completions came from the weights just rolled back
            self._meta["buffer_dropped_at"].append(decision.step)
            guard.components.call("trl", guard.recorder.meta, {META_KEY: self._meta})
        if self._weights is not None:
            guard.components.call(
                "trl weights", self._weights.after_update, guard, decision, self._objects["optimizer"]
            )
        return decision


class _FiniteWeights:
    """Under ``"recover"``, for a GRPO or RLOO trainer: the weights checked finite after each applied update, and TRL's
    next generation held back once when they are not.

    keel finds non-finite parameters at its next step, from that step's non-finite loss. Between the two, GRPO
    generates completions from the updated weights, and NaN/Inf weights make its sampling raise (``probability tensor
    contains either inf, nan or element < 0``), ending the run before keel can act (helper H's H7; bare TRL crashes the
    same way). So after each applied update the weights' norms are taken in one ``torch._foreach_norm`` and read once;
    when one is not finite, the trainer's ``_prepare_inputs`` hands the next micro-step the completions it buffered
    for the previous update instead of generating (once): trained on by the broken weights, they give a non-finite
    loss, keel's step finds the parameters and rolls back, and the adapter's rollback drops the buffer, so TRL then
    generates from the restored weights. The held step's update is rolled back with the rest.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.hold = False  # the next generation is held back (the weights are not finite)
        self.told = False  # said so, until a rollback: the held step's update leaves them broken, as they were
        original = trainer._prepare_inputs

        @functools.wraps(original)
        def prepare_inputs(generation_batch: Any) -> Any:
            buffered = trainer._buffered_inputs
            if self.hold and trainer.model.training and buffered:
                self.hold = False  # once: if keel does not roll back, TRL generates as it would have
                return buffered[trainer._step % len(buffered)]
            return original(generation_batch)

        trainer._prepare_inputs = prepare_inputs

    def after_update(self, guard: Any, decision: Decision, optimizer: torch.optim.Optimizer) -> None:
        """After ``decision``: drop a hold a rollback made moot; check the weights of an applied update."""
        if decision.action == "rollback":
            self.hold = self.told = False
        if not decision.stepped:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params or _all_finite(params):
            return
        self.hold = True
        if self.told:
            return
        self.told = True
        names = {id(p): n for n, p in self.trainer.model.named_parameters()}
        broken = [names.get(id(p), "?") for p in params if not bool(torch.isfinite(p).all())]
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        update = guard.global_step - 1  # under sync="deferred" `decision` is the update before this one
        say(
            guard,
            f"step {update}: the update left non-finite weights ({shown}); TRL's next generation would sample "
            "from them and raise, so the next step trains on the completions already buffered, and keel rolls back",
        )


def _all_finite(params: list[Tensor]) -> bool:
    """Whether every parameter is finite: one norm per parameter in one ``foreach`` call, one read to the host."""
    norms = torch._foreach_norm(params)
    finite = torch.isfinite(torch.stack([n.float() for n in norms])).all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # FSDP shards: all ranks agree
        flag = finite.float()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag > 0
    return bool(finite)


def _detectors_for(trainer: Any) -> list[Detector] | None:
    """The Guard's default detectors plus the preset for this trainer's kind of training (None: the defaults)."""
    if isinstance(trainer, DPOTrainer):
        return [*default_detectors(), *preference_detectors()]
    if isinstance(trainer, POLICY_GRADIENT):
        return [*_not_on_the_loss(default_detectors()), *policy_detectors()]
    return None


def _not_on_the_loss(detectors: list[Detector]) -> list[Detector]:
    """The detectors that do not judge the loss's level (its spikes, its divergence).

    GRPO's loss is a policy-gradient surrogate of group-normalised advantages, not a measure of fit: about 0 of either
    sign (exactly 0 while every completion has the same length), so a spike detector read each ordinary step as a jump
    of millions of times its median — 15 ``critical`` findings in a healthy 100-step run of TRL's ``grpo.py``, which
    ``"skip"`` would have skipped. GRPO's health is in TRL's statistics (entropy, KL, rewards, clip ratios: the
    policy detectors); a non-finite loss is still caught (the non-finite detector reads every value).
    """
    return [d for d in detectors if getattr(getattr(d, "config", None), "signal", None) != keys.LOSS]


def _check_trainer(trainer: Any) -> None:
    if not isinstance(trainer, TRAINERS):
        raise ValueError(
            f"guard_trainer(trainer=<{type(trainer).__name__}>): allowed: a trl "
            f"{', '.join(t.__name__ for t in TRAINERS[:-1])} or {TRAINERS[-1].__name__}"
        )
    metrics = getattr(trainer, "_metrics", None)
    if not (isinstance(metrics, Mapping) and isinstance(metrics.get("train"), Mapping)):
        raise ValueError(
            f"guard_trainer(trainer=<{type(trainer).__name__}>) has no _metrics['train'] of TRL statistics "
            f"(found {type(metrics).__name__}); allowed: a trainer of trl>=1.16,<1.17, which keeps them there"
        )
    if any(isinstance(cb, KeelCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError(
            f"guard_trainer(trainer=<{type(trainer).__name__}>): it has a keel callback already; allowed: one "
            "keel callback per trainer"
        )


def _wrap_compute_loss(trainer: Any, callback: KeelTRLCallback) -> None:
    """Make the trainer's ``compute_loss`` hand each training micro-batch's loss to ``callback`` as well."""
    original = trainer.compute_loss

    @functools.wraps(original)
    def compute_loss(model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(model, inputs, *args, **kwargs)
        if model.training and torch.is_grad_enabled():  # not evaluation inside training
            loss = out[0] if isinstance(out, tuple) else out
            if isinstance(loss, Tensor):
                items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
                callback.record_trainer_loss(loss, share=_scaled_for_accumulation(trainer, items))
        return out

    trainer.compute_loss = compute_loss


def _scaled_for_accumulation(trainer: Any, num_items_in_batch: object) -> bool:
    """Whether the Trainer takes ``compute_loss``'s loss as a share of the step's total (and logs the sum) rather
    than dividing it by the accumulation steps (and logging the mean): transformers' own rule in
    ``Trainer.training_step``."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is not None:
        return bool(scaled)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )
