"""EvoMoE's dense-to-sparse (DTS) gate with its temperature schedule, as a hook on an existing router.

Nie et al. (2021), "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate",
arXiv 2112.14397; official code ``codecaution/EvoMoE`` (``fairseq/modules/moe/topkgate.py``,
``fairseq_cli/train.py``, ``fairseq/dataclass/configs.py``). See reference/seed-catalog.md T10.

In training the gate is a Gumbel-softmax of the router's log-probabilities at temperature τ, g = GumbelSoftmax(
log softmax(x), τ), and every expert whose gate exceeds a threshold runs, weighted by g: at high τ almost every
expert is active (dense), and as τ anneals the gate sharpens. From the hard-switch update on, each token goes to
the argmax of its Gumbel sample alone, weighted by that gate (top-1). Outside training the gate is top-1 of the
router's softmax, as the official ``TopKGate`` evaluates.

τ schedule (official ``fairseq_cli/train.py``), with D the decay length:
    exp:    τ_t = max(τ_max · exp(t · ln(τ_min / τ_max) / D), τ_min)
    linear: τ_t = max(τ_max − t · (τ_max − τ_min) / D, τ_min)

Official defaults: τ_max 1.0, τ_min 0.5, D (``gumbel_decay_factor``) 1 — τ reaches τ_min at update 1 — and
``switch_to_hard_gumbel_softmax`` −1, which makes the gate hard from update 0, so the dense phase never happens
unless it is set. keel therefore requires the hard-switch update and anneals over the dense phase by default.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from keel.losses._checks import check_number, is_int
from keel.losses._router_layout import split_router_output

SCHEDULES = ("exp", "linear")
# fairseq/dataclass/configs.py defaults in the official code.
TAU_MAX = 1.0
TAU_MIN = 0.5
# GUMBEL_THRESHOLD: 0.001 at the commit the seed catalog read (d1e49d2); 0.02 in another stored version (09f0d09).
THRESHOLD = 0.001
UPDATE_BUFFER = "dense_to_sparse_update"  # the update count, a buffer on each gated router


def check_schedule_options(
    owner: str,
    *,
    hard_step: object,
    decay_steps: object,
    tau_max: object,
    tau_min: object,
    schedule: object,
    threshold: object,
) -> None:
    """Raise one ValueError naming ``owner.<option>``, its value and what is allowed, for the gate's schedule options
    (``decay_steps=None`` is let through: the stabilizer derives it from ``hard_step``)."""
    for name, value, low in (("hard_step", hard_step, 0), ("decay_steps", decay_steps, 1)):
        ok = is_int(value) and value >= low  # type: ignore[operator]
        if not ok and (value is not None or name == "hard_step"):
            required = " (required: the official default -1 turns the gate hard at update 0)"
            raise ValueError(
                f"{owner}.{name}={value!r}; allowed: an int >= {low}{required if name == 'hard_step' else ''}"
            )
    tau_min = check_number(f"{owner}.tau_min", tau_min, low=0.0, low_open=True)
    check_number(f"{owner}.tau_max", tau_max, low=tau_min)
    check_number(f"{owner}.threshold", threshold, low=0.0, high=1.0)
    if schedule not in SCHEDULES:
        raise ValueError(f"{owner}.schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}")


class DenseToSparseSchedule:
    """The gate's temperature and phase as a function of the update count, shared by every DTS router of a model.

    ``update`` counts training forwards of the model (the model's forward pre-hook advances it; the first training
    forward is update 0), or, after `follow`, the optimizer's steps: under gradient accumulation call
    ``schedule.follow(optimizer)``, else ``hard_step`` and ``decay_steps`` are in forwards (N per update).

    The count is model state: each router the schedule gates (`attach`) holds it in a persistent buffer
    ``dense_to_sparse_update`` (0-dim int64), so the model's state dict, keel's snapshots, a rollback and a resume
    carry it. The schedule mirrors it on the host, so that no forward reads the device; a write from outside the
    schedule (``load_state_dict``, a keel restore, an assigned buffer) is noticed by the buffer's identity and
    version counter and read once. τ is computed from the buffer inside the router's hook (a tensor), so a
    compiled gate does not recompile as τ anneals.

    Args:
        hard_step: First update routed hard (top-1 of the Gumbel sample).
        decay_steps: D, the updates τ takes from τ_max to τ_min.
        tau_max: τ at update 0.
        tau_min: The floor of τ.
        schedule: ``"exp"`` or ``"linear"``.
        threshold: Gate value an expert must exceed to run.
        update: The current update (−1 before the first training forward).
    """

    def __init__(
        self,
        hard_step: int,
        decay_steps: int,
        tau_max: float = TAU_MAX,
        tau_min: float = TAU_MIN,
        schedule: str = "exp",
        threshold: float = THRESHOLD,
        update: int = -1,
    ) -> None:
        check_schedule_options(
            "DenseToSparseSchedule",
            hard_step=hard_step,
            decay_steps=decay_steps,
            tau_max=tau_max,
            tau_min=tau_min,
            schedule=schedule,
            threshold=threshold,
        )
        if decay_steps is None:  # let through above for the stabilizer only
            raise ValueError("DenseToSparseSchedule.decay_steps=None; allowed: an int >= 1")
        if not is_int(update) or update < -1:
            raise ValueError(f"DenseToSparseSchedule.update={update!r}; allowed: an int >= -1 (-1: before the first)")
        self.hard_step, self.decay_steps = hard_step, decay_steps
        self.tau_max, self.tau_min, self.schedule, self.threshold = tau_max, tau_min, schedule, threshold
        self._routers: list[nn.Module] = []
        self._written: list[tuple[Tensor | None, int]] = []  # each router's buffer, its version after our last write
        self._optimizer_hook: RemovableHandle | None = None
        self.update = update

    @property
    def update(self) -> int:
        """The current update (−1 before the first training forward)."""
        self._read_outside_write()
        return self._update

    @update.setter
    def update(self, value: int) -> None:
        self._update = int(value)
        self._hard = self._update >= self.hard_step  # the phase the router hooks read (no int for dynamo to guard)
        with torch.no_grad():
            for buffer in self._buffers():
                buffer.fill_(self._update)
        self._remember_writes()

    def __repr__(self) -> str:
        return (
            f"DenseToSparseSchedule(hard_step={self.hard_step}, decay_steps={self.decay_steps}, "
            f"tau_max={self.tau_max}, tau_min={self.tau_min}, schedule={self.schedule!r}, "
            f"threshold={self.threshold}, update={self.update})"
        )

    def temperature(self, update: int | None = None) -> float:
        """τ at ``update`` (the current update when None)."""
        t = self.update if update is None else update
        return float(self.temperature_of(torch.tensor(t, dtype=torch.float64)))

    def temperature_of(self, update: Tensor) -> Tensor:
        """τ at the update ``update`` holds (a 0-dim tensor, computed in its floating dtype, float32 for an int)."""
        t = update.clamp_min(0)
        t = t if t.is_floating_point() else t.float()
        if self.schedule == "exp":
            tau = self.tau_max * torch.exp(t * (math.log(self.tau_min / self.tau_max) / self.decay_steps))
        else:
            tau = self.tau_max - t * ((self.tau_max - self.tau_min) / self.decay_steps)
        return tau.clamp_min(self.tau_min)

    def is_hard(self, update: int | None = None) -> bool:
        """Whether ``update`` (the current one when None) routes each token to one expert."""
        return (self.update if update is None else update) >= self.hard_step

    def attach(self, router: nn.Module) -> RemovableHandle:
        """Give ``router`` the count as a persistent buffer ``dense_to_sparse_update`` (on the router's device), kept
        equal to the schedule's. A state dict without it (saved before keel kept the count) loads with a warning,
        the count unchanged. Returns the handle of that load hook."""
        router.register_buffer(UPDATE_BUFFER, torch.full((), self._update, dtype=torch.long, device=_device_of(router)))
        self._routers.append(router)
        self._remember_writes()
        return router.register_load_state_dict_pre_hook(self._keep_count_missing_from)

    @torch.compiler.disable
    def advance(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: one training forward is one more update (unless it follows an optimizer).
        Run eagerly under ``torch.compile``: the host count is no guard of the compiled graph."""
        self._read_outside_write()
        if module.training and self._optimizer_hook is None:
            self._step()

    def follow(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Count ``optimizer``'s steps instead of training forwards (right under gradient accumulation and with the
        Hugging Face ``Trainer``): the update before its first step is 0, and each ``step()`` adds one."""

        @torch.compiler.disable
        def stepped(*_: Any) -> None:
            self._read_outside_write()
            self._step()

        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self.update = max(self.update, 0)
        self._optimizer_hook = optimizer.register_step_post_hook(stepped)
        return self._optimizer_hook

    def _step(self) -> None:
        self._update += 1
        self._hard = self._update >= self.hard_step
        buffers = self._buffers()
        if buffers:
            with torch.no_grad():
                torch._foreach_add_(buffers, 1)
        self._remember_writes()

    def _buffers(self) -> list[Tensor]:
        found = (router._buffers.get(UPDATE_BUFFER) for router in self._routers)
        return [b for b in found if b is not None]

    def _remember_writes(self) -> None:
        buffers = [router._buffers.get(UPDATE_BUFFER) for router in self._routers]
        self._written = [(b, -1 if b is None else b._version) for b in buffers]

    def _read_outside_write(self) -> None:
        """Take the count from a router's buffer written since the schedule's own last write (one host read), and
        make every router's buffer equal to it."""
        for router, (seen, version) in zip(self._routers, self._written, strict=True):
            buffer = router._buffers.get(UPDATE_BUFFER)
            if buffer is not None and (buffer is not seen or buffer._version != version):
                self.update = int(buffer.item())
                return

    def _keep_count_missing_from(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Load pre-hook of a router: a state dict without the count (saved before keel kept it) loads the rest, the
        count as it is, with a warning saying so."""
        key = prefix + UPDATE_BUFFER
        buffer = module._buffers.get(UPDATE_BUFFER)
        if key in state_dict or buffer is None:
            return
        state_dict[key] = buffer.detach().clone()  # load_state_dict's own copy of the caller's dict
        warnings.warn(
            f"dense_to_sparse: the state dict has no {UPDATE_BUFFER} (saved before keel kept the EvoMoE update "
            f"count in the model), so the gate's schedule stays at update {self._update}; set "
            "result.changes[0].extra.update (schedule.update) to the checkpoint's update to continue its phase",
            stacklevel=2,
        )


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def dense_to_sparse_route(
    logits: Tensor, schedule: DenseToSparseSchedule, *, training: bool, update: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(weights, chosen experts) of the DTS gate for ``(T, E)`` router logits.

    Dense phase: every expert index in order, weighted g·[g > threshold] (an expert below it gets weight 0 and
    contributes nothing; it is still computed). Hard phase: ``(T, 1)`` argmax of the Gumbel sample with its gate
    value. Outside training: ``(T, 1)`` top-1 of softmax(logits) with its probability. τ is the schedule's at
    ``update`` (a router's count buffer), else at the schedule's current update; the phase is the schedule's.
    """
    logits = logits.float()
    if not training:
        weights, chosen = logits.softmax(dim=-1).max(dim=-1, keepdim=True)
        return weights, chosen
    if update is None:
        update = torch.tensor(float(schedule.update), device=logits.device)
    gates = _gumbel_softmax(logits.log_softmax(dim=-1), schedule.temperature_of(update))
    gates = gates * (gates > schedule.threshold)
    if schedule._hard:
        weights, chosen = gates.max(dim=-1, keepdim=True)
        return weights, chosen
    chosen = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
    return gates, chosen


def _gumbel_softmax(logits: Tensor, tau: Tensor) -> Tensor:
    """``F.gumbel_softmax(logits, tau, hard=False)`` (the same draws) with τ a tensor."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


class DenseToSparseHook:
    """Forward hook on a router returning ``(logits, weights, indices)``: replaces weights and indices by the DTS
    gate's (`dense_to_sparse_route`); the logits pass through for probes and aux losses."""

    def __init__(self, schedule: DenseToSparseSchedule) -> None:
        self.schedule = schedule

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        logits, weights, _ = split_router_output(output)
        update = getattr(module, UPDATE_BUFFER, None)  # the count as model state: no host read, no recompile
        new_weights, chosen = dense_to_sparse_route(
            logits, self.schedule, training=module.training, update=update if isinstance(update, Tensor) else None
        )
        if weights is not None and weights.is_floating_point():
            new_weights = new_weights.to(weights.dtype)
        return type(output)((logits, new_weights, chosen, *output[3:]))
