"""Distributed Guard: one collective per step so that every rank decides on the same all-reduced values.

Under ``torchrun`` each rank runs its own `Guard`. Left alone, each would decide on its own gradients, and one
rank skipping while another steps desynchronises the replicas (mmf PR #1073 hung; ecmwf/WeatherGenerator PR
#2726 let a rank-0-only decision pass poisoned gradients through). Here the packed per-step vector every
`Guard` builds anyway goes through one ``all_reduce`` before the host copy, so each rank's detectors read
identical values and take identical decisions:

| signal                                        | DDP (replicated)      | FSDP (sharded)                 |
|-----------------------------------------------|-----------------------|--------------------------------|
| ``loss``, unknown keys                        | mean over ranks       | mean over ranks                |
| norms (``grad/norm``, ``param/norm`` …)        | mean (equal on ranks) | √Σ over ranks of local norm²   |
| a ``max``/``min`` segment (``attn/max_logit``) | max / min             | max / min                      |

NaN and ±Inf propagate through every rule, so one rank's fault reaches every rank's decision. The same
collective carries a few numbers per rank (its loss, gradient norm, and — through a DDP communication hook —
the norm of its own gradient before averaging and that gradient's dot product with the average). They come
back as per-rank families (``rank/loss/<r>``, ``rank/grad/norm/<r>``, ``rank/grad/local_norm/<r>``,
``rank/grad/cos/<r>``) for `RankOutlierDetector`, which names a faulty rank or a bad data shard.

Max and min cannot be summed, so those entries, and the per-rank numbers, travel in rank-owned slots of a
zero-filled vector: one ``all_reduce(SUM)`` then acts as an all-gather (on gloo it is about 2.5× faster than
``all_gather_into_tensor``, measured on CPU), and adding zeros keeps every value exact.

The vector's layout must be the same on every rank, or the collective fails (gloo aborts the process, NCCL hangs
or mixes values). keel's own measurements are alike on every rank, but the loop's are not always: ``signals=``
or ``grad_norm=`` given on rank 0 only (the usual ``if rank == 0:`` logging). So before it, the ranks compare a
checksum of their layouts — two integers all-reduced on a gloo group of CPU tensors, no device sync. When the
layouts differ, the ranks exchange them once, reduce the entries every rank has, keep the others as each rank's
own values (not agreed: a decision on them may differ between ranks) and warn once naming them.

That check is a second blocking round trip per step (a TCP one on a multi-node NCCL job), so a `Guard` reads its
values with `RankSync.to_host`, which skips it on a healthy step: once every rank has packed a layout on one step
(an *agreed* layout, the last few kept), the next steps send the values in the widest agreed layout's buffer with
one count per agreed layout appended, one ``all_reduce`` for both. A rank whose layout is none of them sends zeros
of the same size, so the collective never mismatches; when the counts (every rank reads the same) say the ranks
did not all pack the same agreed layout, every rank redoes the step with the check, as above, on its own packed
values. The first step, a new layout (a probe's first cadence step, a key one rank adds) and any step inside DDP's
join take the check.

Inside DDP's join context (``with model.join():``, or ``Join([model, ...])``, for uneven inputs) a rank that has run
out of batches answers only the collectives of the join hooks. RankSync puts its own hook after DDP's (by wrapping
the model's ``join_hook``): while every rank has batches, keel all-reduces as everywhere else; the first time a rank
has run out, its hook answers the others' layout check once with neutral values and a "joined" flag, and from then to
the join's end each rank decides on its own values (warned once). A Guard made inside the join is not in its hooks:
each rank then decides on its own values for the whole join.

A rank that hangs or is late (a stuck dataloader, a rank-0-only eval, a slow file system) makes the others wait in
the next collective, DDP's or keel's, until the process group's timeout; keel's waits are never longer than the loop's:
its gloo twin of an NCCL world takes the world's timeout (also one set later, as torchtitan does after its first step),
and after one of keel's collectives has failed no other is made (`RankSync._collective`): each step then goes on
unguarded, as the bare loop would, and each rank says so once.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from keel._core import keys
from keel._core.caller import loop_stacklevel
from keel._core.errors import KeelWarning
from keel._core.validate import check_types
from keel.signals import Packed, unpack
from keel.signals.pack import HostValues

Rule = Literal["mean", "norm", "max", "min"]

_NORMS = (keys.GRAD_NORM, keys.PARAM_NORM, keys.UPDATE_NORM)


@dataclass(kw_only=True)
class DistributedConfig:
    """How a `Guard` reduces its signals across ranks.

    Attributes:
        sharded: Whether parameters and gradients are sharded across ranks (FSDP): norms then combine as
            √Σ norm². ``None`` detects it (parameters that are ``DTensor``\\ s are sharded).
        rank_stats: Register a DDP communication hook that measures each rank's gradient before averaging
            (its norm and its cosine to the other ranks' mean), for `RankOutlierDetector`. Costs one copy
            of each gradient bucket per step; only for a ``DistributedDataParallel`` model.
        process_group: The group to reduce over; ``None`` is the default (world) group. A subgroup of the job
            (the data-parallel group of a 2-D job) keeps its run in ``run_dir/group-<g>``, ``g`` the job-wide rank
            of the group's rank 0, so every group's Guard can be given the job's one run_dir.
    """

    sharded: bool | None = None
    rank_stats: bool = True
    process_group: Any = None

    def __post_init__(self) -> None:
        check_types(self)


def reduction_rule(key: str, sharded: bool) -> Rule:
    """How one signal key combines across ranks (see the module's table)."""
    segments = key.rstrip("/").split("/")
    if key.rstrip("/") in _NORMS or key.rstrip("/").startswith(tuple(n + "/" for n in _NORMS)):
        return "norm" if sharded else "mean"
    if any(s == "max" or s.startswith("max_") or s.endswith("_max") for s in segments):
        return "max"
    if any(s == "min" or s.startswith("min_") or s.endswith("_min") for s in segments):
        return "min"
    return "mean"


def leave_one_out_cosine(local_sq: Tensor, dot: Tensor, mean_sq: Tensor, world: int) -> Tensor:
    """cos(g_r, mean of the other ranks' gradients) for each rank r, from per-rank sums.

    Args:
        local_sq: ‖g_r‖² per rank.
        dot: ⟨g_r, ḡ⟩ per rank, where ḡ is the mean of all ranks' gradients.
        mean_sq: ‖ḡ‖² (equal on all ranks; a vector, one per rank).
        world: Number of ranks (≥ 2).

    Returns:
        One cosine per rank; NaN where a gradient is zero or non-finite.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> m = g.mean(0)
        >>> leave_one_out_cosine(g.pow(2).sum(1), g @ m, m.dot(m).expand(2), 2)
        tensor([0., 0.])
    """
    w = float(world)
    others_dot = (w * dot - local_sq) / (w - 1)  # ⟨g_r, Σ_{s≠r} g_s⟩ / (W−1)
    others_sq = (w * w * mean_sq - 2 * w * dot + local_sq) / (w - 1) ** 2
    denom = torch.sqrt(local_sq.clamp_min(0) * others_sq.clamp_min(0))
    return torch.where(denom > 0, others_dot / denom, torch.full_like(denom, math.nan))


class _RankGradStats:
    """DDP communication hook state: per bucket, (‖g_r‖², ⟨g_r, ḡ⟩, ‖ḡ‖²) of this rank's gradient."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.buckets: dict[int, Tensor] = {}

    def record(self, index: int, local: Tensor, mean: Tensor) -> None:
        a, b = local.reshape(-1).float(), mean.reshape(-1).float()
        self.buckets[index] = torch.stack([a.dot(a), a.dot(b), b.dot(b)])

    def take(self) -> Tensor | None:
        """The sums over buckets since the last call, or None when no gradient was synchronised."""
        if not self.buckets:
            return None
        total = torch.stack(list(self.buckets.values())).sum(0)
        self.buckets = {}
        return total


def _comm_hook(stats, bucket):  # no annotations: DDP rejects any but its own classes, and they import lazily
    """DDP communication hook: the average DDP's own reducer takes (scaled by 1/world, then summed, so gradients
    stay bit-identical to no hook), plus the rank's gradient statistics for `RankOutlierDetector`.

    DDP's python ``allreduce_hook`` divides by the world size instead: x / 3 rounds unlike x * (1/3), so at 3 ranks
    a guarded run drifted ~1e-8 from plain DDP, and a resumed run from the uninterrupted one."""
    buffer = bucket.buffer()
    local = buffer.detach().clone()  # the rank's own gradient; the all-reduce overwrites the buffer
    index = bucket.index()
    buffer.mul_(1.0 / dist.get_world_size(stats.group))

    def record(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        mean = fut.value()[0]
        stats.record(index, local, mean)
        return mean

    work = dist.all_reduce(buffer, group=stats.group, async_op=True)
    return work.get_future().then(record)  # type: ignore[union-attr]


def _take_comm_hook(model: nn.parallel.DistributedDataParallel, group: Any) -> _RankGradStats | None:
    """keel's communication hook on ``model``: registered now, or the one an earlier Guard on it registered (DDP
    takes one hook per model and never lets it go: a closed or refused Guard's stays), whose statistics this Guard
    takes over; None when the loop registered its own (do without)."""
    registered = getattr(model, "_comm_hooks", [])
    if not registered:
        stats = _RankGradStats(group)
        try:
            model.register_comm_hook(stats, _comm_hook)
            return stats
        except RuntimeError:  # a hook DDP does not list (a builtin one): the loop's
            return None
    hook, state = registered[-1]
    if hook is _comm_hook and isinstance(state, _RankGradStats) and state.group == group:
        state.take()  # what the earlier Guard's last steps left
        return state
    return None


def _is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


class RankSync:
    """Reduces a `Guard`'s packed per-step measurements across ranks with one ``all_reduce``.

    Build it with `RankSync.create`, which returns None outside ``torch.distributed`` (or with one rank), so the
    single-process path keeps exactly its cost.

    Attributes:
        rank: This process's rank in the group.
        world: Number of ranks.
        leader: The job-wide rank of the group's rank 0 when the group is a subgroup of the job (a data-parallel
            group of a 2-D job), else None.
        sharded: Whether norms combine as √Σ norm² (FSDP) rather than as a mean (DDP).
    """

    def __init__(self, model: nn.Module, config: DistributedConfig) -> None:
        self.config = config
        self.group = config.process_group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.leader = dist.get_global_rank(self.group, 0) if self.world < dist.get_world_size() else None
        self.sharded = _is_sharded(model) if config.sharded is None else config.sharded
        self._plans: dict[Any, _Plan] = {}
        self._agreed: list[int] = []  # checksums of layouts every rank packed on one step (`_agree`), oldest first
        self._agreed_sizes: dict[int, int] = {}
        self._agreed_width = 0
        self._layout_group, self._layout_device = _host_group(self.group)
        self._warned_unshared = False
        self._model = model
        self._warned_uneven = False
        self._join = _JoinState()
        self._warned_joined = False
        self._closed = False
        self._join_hook: _JoinHookSlot | None = None
        self._failed: str | None = None  # the error of keel's collective that failed (`_collective`), if one did
        self.stats: _RankGradStats | None = None
        if config.rank_stats and isinstance(model, nn.parallel.DistributedDataParallel):
            self.stats = _take_comm_hook(model, self.group)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self._join_hook = _JoinHookSlot(model, self)

    @classmethod
    def create(cls, model: nn.Module, config: DistributedConfig | bool | None) -> RankSync | None:
        """A `RankSync` when running under ``torch.distributed`` with more than one rank, else None.

        Args:
            model: The (DDP- or FSDP-wrapped) model.
            config: ``None`` decides from the environment, ``False`` never reduces, ``True`` uses the defaults.

        Raises:
            ValueError: ``config`` is ``True`` or a config but no process group is initialised.
        """
        if config is False:
            return None
        if config is None or config is True:
            asked, config = config is True, DistributedConfig()
        else:
            asked = True
            if not isinstance(config, DistributedConfig):
                raise ValueError(f"distributed={config!r}; allowed: None, True, False or a DistributedConfig")
        if not (dist.is_available() and dist.is_initialized()):
            if asked:
                raise ValueError(
                    "distributed was requested but torch.distributed is not initialised; allowed: "
                    "call torch.distributed.init_process_group first (torchrun does not do it)"
                )
            return None
        if dist.get_world_size(config.process_group) < 2:
            return None
        return cls(model, config)

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world,
            "backend": str(dist.get_backend(self.group)),
            "sharded": self.sharded,
            "rank_stats": self.stats is not None,
        }

    def reduce(self, packed: Packed) -> Packed:
        """All-reduce one step's packed measurements; adds the per-rank families to the first group.

        No host sync but the layout check's (on the CPU): the result stays on device until `unpack` copies it.
        Entries only some ranks packed come back as this rank's own values (see the module's docstring).
        """
        grad_stats = self.stats.take() if self.stats is not None else None
        joining = self._join_mode()
        if joining == "own":
            return packed
        return self._reduce_checked(packed, grad_stats, joining == "agreed")

    def to_host(self, packed: Packed) -> list[HostValues]:
        """`reduce`, then `unpack`: on a step whose layout every rank packed on an earlier step too (a healthy
        step), in ONE collective and one host copy (`_reduce_agreed`); else as `reduce` (a layout check first).

        The values are `reduce`'s, whichever path ran.
        """
        joining = self._join_mode()
        grad_stats = self.stats.take() if self.stats is not None else None
        if joining == "own":
            return unpack(packed)
        if joining == "none" and self._agreed:
            values = self._reduce_agreed(packed, grad_stats)
            if values is not None:
                return values
        return unpack(self._reduce_checked(packed, grad_stats, joining == "agreed"))

    def _reduce_checked(self, packed: Packed, grad_stats: Tensor | None, joining: bool) -> Packed:
        """Check that every rank packed the same layout (a collective of two integers), then reduce; a layout
        found alike everywhere joins the agreed ones (`_agree`)."""
        plan = self._plan(packed.layout, grad_stats is not None, packed.tensor.device)
        same = self._same_everywhere(plan.checksum, joining)
        if same is None:
            return packed
        if same:
            self._agree(plan)
            return self._reduce(packed.tensor, plan, grad_stats)
        return self._reduce_shared(packed, grad_stats)

    def _agree(self, plan: _Plan) -> None:
        """Remember a layout every rank packed. Every rank calls this on the same steps with the same layouts, so
        every rank's list is the same, in the same order; a few layouts alternate (a probe's cadence), so several
        are kept, the oldest dropped first."""
        if plan.checksum in self._agreed:
            return
        if len(self._agreed) == _AGREED_LAYOUTS:
            del self._agreed_sizes[self._agreed.pop(0)]
        self._agreed.append(plan.checksum)
        self._agreed_sizes[plan.checksum] = plan.size
        self._agreed_width = max(self._agreed_sizes[c] for c in self._agreed)

    def _reduce_agreed(self, packed: Packed, grad_stats: Tensor | None) -> list[HostValues] | None:
        """The values of `_reduce`, read to the host, in one collective without a layout check — or None when not
        every rank packed the same agreed layout (every rank then gets None: they all read the same counts).

        The buffer is the widest agreed layout's, and one count per agreed layout plus one for "none of them": a rank
        fills its layout's values (zeros if it packed none of them) and adds 1 to its layout's count. Its size is the
        same on every rank whatever they packed, so the collective never mismatches; the counts say whether every
        rank filled the same layout (its count is the world size)."""
        local = packed.tensor
        plan = self._plan(packed.layout, grad_stats is not None, local.device)
        slot = self._agreed.index(plan.checksum) if plan.checksum in self._agreed else len(self._agreed)
        width = self._agreed_width
        size = width + len(self._agreed) + 1
        if slot < len(self._agreed):
            buffer = self._fill(local, plan, grad_stats, size)
        else:
            buffer = torch.zeros(size, dtype=torch.float64, device=local.device)
        buffer[width + slot] = 1.0
        self._collective(dist.all_reduce, buffer, group=self.group)
        if slot == len(self._agreed):
            return None  # this rank's layout is new: not every rank's is the agreed one, whatever the counts say
        reduced = self._combine(buffer[: plan.size], local, plan, grad_stats)
        counted = Packed(
            torch.cat([reduced.tensor, buffer[width + slot : width + slot + 1]]), [*reduced.layout, *_COUNT]
        )
        *values, (agreement, _) = unpack(counted)  # the values and this layout's rank count, in one copy
        return values if agreement[_AGREEMENT] == self.world else None

    def _fill(self, local: Tensor, plan: _Plan, grad_stats: Tensor | None, size: int) -> Tensor:
        """A zero buffer of ``size`` whose first ``plan.size`` entries carry this rank's part of `_reduce`'s sum:
        the summed entries (squared for a √Σ norm²), then this rank's slot of gathered and per-rank values."""
        device = local.device
        rank_values = [
            local[i] if i >= 0 else torch.full((), math.nan, dtype=torch.float64, device=device)
            for i in (plan.loss_index, plan.grad_norm_index)
        ]
        if grad_stats is not None:
            rank_values.extend(grad_stats.to(device=device, dtype=torch.float64).unbind())
        own = torch.cat([local[plan.gathered], torch.stack(rank_values)])
        n_sum, n_own = len(plan.summed), own.numel()
        buffer = torch.zeros(size, dtype=torch.float64, device=device)
        summed = local[plan.summed]
        buffer[:n_sum] = torch.where(plan.squared, summed * summed, summed)
        buffer[n_sum + self.rank * n_own : n_sum + (self.rank + 1) * n_own] = own
        return buffer

    def _reduce(self, local: Tensor, plan: _Plan, grad_stats: Tensor | None) -> Packed:
        buffer = self._fill(local, plan, grad_stats, plan.size)
        self._collective(dist.all_reduce, buffer, group=self.group)
        return self._combine(buffer, local, plan, grad_stats)

    def _combine(self, buffer: Tensor, local: Tensor, plan: _Plan, grad_stats: Tensor | None) -> Packed:
        """The reduced packed vector, with the per-rank families, from the all-reduced buffer of `_fill`."""
        n_sum = len(plan.summed)
        total = buffer[:n_sum]
        by_rank = buffer[n_sum:].view(self.world, -1)  # [rank, gathered entries then per-rank values]
        out = local.clone()
        out[plan.summed] = torch.where(plan.squared, total.sqrt(), total / self.world)
        k = len(plan.gathered)
        if k:
            gathered = by_rank[:, :k]
            out[plan.gathered] = torch.where(plan.is_max, gathered.amax(0), gathered.amin(0))
        per_rank = [by_rank[:, k], by_rank[:, k + 1]]
        if grad_stats is not None:
            local_sq, dot, mean_sq = by_rank[:, k + 2], by_rank[:, k + 3], by_rank[:, k + 4]
            per_rank += [local_sq.sqrt(), leave_one_out_cosine(local_sq, dot, mean_sq, self.world)]
        head = out[: plan.first_group_end]
        tensor = torch.cat([head, *per_rank, out[plan.first_group_end :]])
        return Packed(tensor, plan.layout)

    def _same_everywhere(self, checksum: int, joining: bool = False) -> bool | None:
        """Whether every rank packed a layout with this checksum: max and min over ranks in one collective of two
        integers, on the CPU (a host read, no device sync) unless the group is a subgroup of another backend.

        Inside DDP's join (``joining``) a third integer says whether a rank has run out of batches: such a rank's
        join hook answers this collective with neutral values (`_shadow_step`). None then, and from here to the
        join's end every rank decides on its own values (no rank's keel collectives are answered any more)."""
        values = [checksum, -checksum, _ACTIVE] if joining else [checksum, -checksum]
        _follow_timeout(self._layout_group, self.group)
        both = torch.tensor(values, dtype=torch.int64, device=self._layout_device)
        self._collective(dist.all_reduce, both, op=dist.ReduceOp.MAX, group=self._layout_group)
        high, negative_low, *joined = both.tolist()
        if joined and joined[0] == _JOINED:
            self._join.someone_joined = True
            self._warn_joined()
            return None
        return bool(high == -negative_low)

    def _shadow_step(self) -> None:
        """On a rank that has run out of batches inside DDP's join, once: answer the other ranks' next layout check
        (their next step's first collective) with neutral values and the "joined" flag; they then stop all-reducing
        keel's values until the join ends, so this rank answers nothing more."""
        if self.stats is not None:
            self.stats.take()  # DDP's hook shadowed the backward with zero gradients: nothing of this rank's own
        if self._join.someone_joined or self._closed or self._failed is not None:  # no collective answers it
            return
        self._join.someone_joined = True
        neutral = torch.tensor([_NEUTRAL, _NEUTRAL, _JOINED], dtype=torch.int64, device=self._layout_device)
        dist.all_reduce(neutral, op=dist.ReduceOp.MAX, group=self._layout_group)

    def _join_began(self) -> None:
        """A join context was made with this RankSync's hook in it (every rank makes it): agree until one runs out."""
        self._join = _JoinState(shadowed=True)

    def _join_ended(self) -> None:
        """Every rank has left the join: keel agrees on every step again."""
        if self.stats is not None:
            self.stats.take()
        self._join = _JoinState(ended=getattr(self._model, "_join_config", None))

    def _warn_joined(self) -> None:
        if self._warned_joined:
            return
        self._warned_joined = True
        warnings.warn(
            f"keel: rank {self.rank}: another rank ran out of batches inside DDP's join: from here until the join "
            "ends each rank decides on its own values, not agreed "
            "across ranks, so a skip or rollback decided on one rank's values alone desynchronises the replicas "
            "(DDP's join then gives every rank the last joiner's weights); DistributedSampler(drop_last=True) keeps "
            "the ranks' batches even",
            KeelWarning,
            stacklevel=loop_stacklevel(),
        )

    def close(self) -> None:
        """Stop shadowing keel's collectives in DDP's joins (the Guard is closed: the loop makes none any more)."""
        self._closed = True
        if self._join_hook is not None:
            self._join_hook.remove()

    def _reduce_shared(self, packed: Packed, grad_stats: Tensor | None) -> Packed:
        """The rare step whose layouts differ between ranks: exchange them, reduce the entries every rank has
        (in rank 0's order), and append this rank's others, unreduced, to their groups."""
        layouts: list[Any] = [None] * self.world
        _follow_timeout(self._layout_group, self.group)
        self._collective(dist.all_gather_object, layouts, _entries(packed.layout), group=self._layout_group)
        everywhere = set.intersection(*(set(entries) for entries in layouts))
        shared = [entry for entry in layouts[0] if entry in everywhere]
        mine = _entries(packed.layout)
        only_here = [entry for entry in mine if entry not in everywhere]
        self._warn_unshared(only_here)
        starts = _starts(packed.layout)
        shared_layout = _layout_of(shared, packed.layout)
        index = [i for entry in shared for i in range(starts[entry], starts[entry] + entry[3])]
        local = packed.tensor
        plan = self._plan(shared_layout, grad_stats is not None, local.device)
        reduced = self._reduce(local[torch.tensor(index, dtype=torch.long, device=local.device)], plan, grad_stats)
        # the result's groups, each followed by this rank's own entries of that group, picked from [reduced, local]
        reduced_starts, offset = _starts(reduced.layout), reduced.tensor.numel()
        picks: list[int] = []
        layout: list[tuple[list[str], list[tuple[str, tuple[str, ...]]]]] = []
        for g, (scalar_keys, families) in enumerate(reduced.layout):
            extra = [entry for entry in only_here if entry[0] == g]
            names = dict(packed.layout[g][1])
            for family, group_picks in (
                ([(g, "s", key, 1) for key in scalar_keys], [e for e in extra if e[1] == "s"]),
                ([(g, "f", key, len(n)) for key, n in families], [e for e in extra if e[1] == "f"]),
            ):
                for entry in family:
                    picks.extend(range(reduced_starts[entry], reduced_starts[entry] + entry[3]))
                for entry in group_picks:
                    picks.extend(range(offset + starts[entry], offset + starts[entry] + entry[3]))
            layout.append(
                (
                    [*scalar_keys, *(e[2] for e in extra if e[1] == "s")],
                    [*families, *((e[2], names[e[2]]) for e in extra if e[1] == "f")],
                )
            )
        combined = torch.cat([reduced.tensor, local])
        return Packed(combined[torch.tensor(picks, dtype=torch.long, device=local.device)], layout)

    def _warn_unshared(self, only_here: list[tuple[int, str, str, int]]) -> None:
        if self._warned_unshared or not only_here:
            return
        self._warned_unshared = True
        names = ", ".join(sorted({entry[2] for entry in only_here}))
        warnings.warn(
            f"keel: rank {self.rank} measured {names} but not every rank did (e.g. signals= or grad_norm= given on "
            "rank 0 only): those are this rank's own values, not agreed across ranks, so a decision on them may "
            "differ between ranks; give the same keys on every rank",
            KeelWarning,
            stacklevel=loop_stacklevel(),
        )

    def _join_mode(self) -> Literal["none", "agreed", "own"]:
        """Whether the loop runs inside DDP's join context (``model.join()`` or ``Join([model, ...])``) and how keel
        decides there: "none" outside one; "agreed" while no rank has run out of batches (this RankSync's join
        hook answers keel's collectives on a rank that has: `_shadow_step`); "own", each rank on its own values,
        once one has, or when the join began before this RankSync existed (its hook is not in that join)."""
        config = getattr(self._model, "_join_config", None)  # set anew by each Join: read it every time
        if config is None or not config.enable or config is self._join.ended:
            return "none"
        if self._join.shadowed:
            return "own" if self._join.someone_joined else "agreed"
        if not self._warned_uneven:
            self._warned_uneven = True
            warnings.warn(
                "keel: the Guard was made inside DDP's join (uneven inputs), so no rank that runs out of batches "
                "answers keel's collective: keel does not all-reduce its signals until the join ends and each rank "
                "decides on its own values; a skip or rollback decided on one rank's loss alone desynchronises the "
                "replicas. Make the Guard before `with model.join():`",
                KeelWarning,
                stacklevel=loop_stacklevel(),
            )
        return "own"

    def _collective(self, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``, one of keel's collectives. One that raises — a rank late past the group's
        timeout (hung, or too slow once), or gone — leaves keel's group broken (gloo closes its pairs, NCCL aborts):
        every later one raises at once instead, without waiting on the group again (keel's checks and the weights
        check then fail on every rank alike, and each step goes on unguarded, as the bare loop would), so keel never
        adds a second timeout (its gloo twin's, then the world's) to the one the loop waits. Warned once, per rank."""
        if self._failed is not None:
            raise RuntimeError(f"keel's collectives stopped after one failed ({self._failed}): none is made any more")
        start = time.monotonic()
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            self._failed = f"{type(exc).__name__}: {str(exc)[:160]}"
            warnings.warn(
                f"keel: rank {self.rank}: keel's {call.__name__} failed after {time.monotonic() - start:.1f} s "
                f"({self._failed}): another rank is late past the process group's timeout (hung or too slow) or has "
                "stopped; keel makes no more collectives in this run, so it no longer checks the steps "
                "(each goes on as the bare loop would)",
                KeelWarning,
                stacklevel=loop_stacklevel(),
            )
            raise

    def _own_values_only(self) -> bool:
        """Whether a collective now would go unanswered (a rank has run out of batches inside DDP's join)."""
        return self._join_mode() == "own"

    def all_equal(self, value: int) -> bool:
        """Whether every rank passes the same integer (a collective: every rank must call it)."""
        high, neg_low = self.all_max([value, -value])
        return high == -neg_low

    def all_ids(self, ids: list[int]) -> list[int]:
        """Every rank's example ids together, ascending and distinct (a collective: every rank must call it).

        For the rare steps that change data (an attributed spike, a rollback): each rank trained on its own batch,
        so the examples to skip are the union of what every rank holds.
        """
        if self._own_values_only():
            return sorted(set(ids))
        parts: list[list[int] | None] = [None] * self.world
        self._collective(dist.all_gather_object, parts, list(ids), group=self.group)
        return sorted({i for part in parts for i in (part or ())})

    def all_max(self, values: list[float]) -> list[float]:
        """The element-wise maximum over ranks of ``values`` (a collective: every rank must call it, with a list
        of the same length). Exact for integers below 2**53. Once a rank has run out of batches inside DDP's join:
        this rank's own."""
        if self._own_values_only():
            return [float(v) for v in values]
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(self.group) == "nccl"
            else torch.device("cpu")
        )
        t = torch.tensor(values, dtype=torch.float64, device=device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    # ------------------------------------------------------------------------------------------------
    def _plan(self, layout: list, with_grad_stats: bool, device: torch.device) -> _Plan:
        shape = tuple((tuple(s), tuple((k, len(n)) for k, n in f)) for s, f in layout)
        signature = (shape, with_grad_stats, device)
        plan = self._plans.get(signature)
        if plan is None:
            if len(self._plans) > 64:  # layouts alternate between a few shapes; never grow without bound
                self._plans.clear()
            plan = self._plans[signature] = _Plan(layout, self.sharded, self.world, with_grad_stats, device)
            plan.checksum = zlib.crc32(repr((shape, with_grad_stats)).encode())  # alike in every process
        return plan


_AGREED_LAYOUTS = 8  # agreed layouts `_reduce_agreed` takes without a layout check: a few alternate, none grows
_AGREEMENT = "agreed_ranks"  # the rank count `_reduce_agreed` reads with the values, in a group of its own
_COUNT: list[tuple[list[str], list[tuple[str, tuple[str, ...]]]]] = [([_AGREEMENT], [])]
_ACTIVE, _JOINED = -1, 0  # the join flag of `_same_everywhere` (a MAX): any rank's 0 says one has run out of batches
_NEUTRAL = -(2**62)  # a joined rank's layout checksum entries: below every rank's, so the MAX is the others'


@dataclass
class _JoinState:
    """Where a RankSync stands in DDP's current join context."""

    shadowed: bool = False  # this join holds the RankSync's hook (the join began after the RankSync was made)
    someone_joined: bool = False  # a rank has run out of batches: keel's collectives go unanswered until the end
    ended: Any = None  # the join config of the last join that ended (it stays on the model after the join)


class _ShadowingJoinHook:  # a torch JoinHook by its methods (its module needs torch.distributed)
    """DDP's own join hook, then keel's: on a rank that has run out of batches, after DDP has shadowed an iteration
    whose gradients the other ranks synchronise (they step, so their Guard checks its layout), `_shadow_step`."""

    def __init__(self, ddp_hook: Any, ddp: nn.parallel.DistributedDataParallel, sync: RankSync) -> None:
        self.ddp_hook, self.ddp, self.sync = ddp_hook, ddp, sync

    def main_hook(self) -> None:
        self.ddp_hook.main_hook()
        if self.ddp.require_forward_param_sync:  # DDP's hook sets it: the other ranks' backward synchronised
            self.sync._shadow_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.ddp_hook.post_hook(is_last_joiner)
        self.sync._join_ended()


class _JoinHookSlot:
    """keel's wrapper of a DDP model's ``join_hook``, which ``model.join()`` and ``Join([model, ...])`` call for the
    hook they run on a rank that has run out of batches: DDP's, with keel's shadow after it (`_ShadowingJoinHook`).
    Set on the model instance; `remove` puts back what was there (or, under a later Guard's, passes through)."""

    def __init__(self, model: nn.parallel.DistributedDataParallel, sync: RankSync) -> None:
        # the RankSync weakly: a Guard whose construction failed (a run_dir in use) or that was dropped unclosed
        # leaves no shadow behind once collected (the others' loops no longer make its collectives)
        self.model, self.sync, self.active = model, weakref.ref(sync), True
        self.before = model.__dict__.get("join_hook")  # a former Guard's slot, or None (DDP's own method)
        if isinstance(self.before, _JoinHookSlot):
            self.before.active = False  # one Guard shadows per model: the newest (an older one is closed or failed)
        self.inner = model.join_hook
        model.join_hook = self  # type: ignore[method-assign]

    def __call__(self, **kwargs: Any) -> Any:
        hook = self.inner(**kwargs)
        sync = self.sync()
        if not self.active or sync is None:
            return hook
        sync._join_began()
        return _ShadowingJoinHook(hook, self.model, sync)

    def __reduce__(self) -> tuple[Any, ...]:
        """A copy of the model (``copy.deepcopy`` for an EMA, ``torch.save``) gets DDP's own join hook, not keel's
        (which would shadow this Guard's collectives in the copy's joins)."""
        return (_ddp_join_hook, (self.model,))

    def remove(self) -> None:
        self.active = False
        if self.model.__dict__.get("join_hook") is not self:
            return  # a later Guard's slot is in front: it passes through this one
        before = self.before
        while isinstance(before, _JoinHookSlot) and not before.active:
            before = before.before
        if before is None:
            del self.model.__dict__["join_hook"]
        else:
            self.model.join_hook = before  # type: ignore[method-assign]


def _ddp_join_hook(model: nn.parallel.DistributedDataParallel) -> Any:
    """DDP's own ``join_hook``, bound to ``model`` (what a copy of a model keel wrapped holds)."""
    return nn.parallel.DistributedDataParallel.join_hook.__get__(model)


_GLOO_WORLDS: dict[Any, Any] = {}  # the default group → its gloo twin, made once per process group (not per Guard)


def _host_group(group: Any) -> tuple[Any, torch.device]:
    """A group over the same ranks for host-side agreement, and the device its tensors live on: the group itself
    when it is gloo (CPU: no device sync); for the default group of another backend, a gloo group over the world,
    made once and shared by every later Guard (one per Guard leaked its sockets: 300 descriptors after 60 Guards);
    a subgroup of another backend itself, on its device (``new_group`` would have to be called by every rank of
    the world; NCCL takes no CPU tensor)."""
    if dist.get_backend(group) == "gloo":
        return group, torch.device("cpu")
    if group is None or group is dist.group.WORLD:
        world = dist.group.WORLD
        if world not in _GLOO_WORLDS:
            _GLOO_WORLDS.clear()  # a world made again (destroy_process_group, init again): its twin is gone too
            # as long as the world's own collectives wait on a hung rank (gloo's default, 30 min, outlasted a
            # shorter NCCL timeout and cut a longer one short)
            _GLOO_WORLDS[world] = dist.new_group(backend="gloo", timeout=_timeout_of(world))
        return _GLOO_WORLDS[world], torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return group, device


def _timeout_of(group: Any) -> timedelta | None:
    """How long a collective of ``group`` waits for a late rank (the timeout given to ``init_process_group``, or set
    since with ``_set_pg_timeout``): the longest of its backends' (NCCL for CUDA tensors, gloo for CPU ones); None
    where no backend says (another vendor's)."""
    group = dist.group.WORLD if group is None else group
    found = []
    for device in getattr(group, "_device_types", ()):
        try:
            timeout = group._get_backend(device).options._timeout
        except Exception:  # a backend without torch's options
            continue
        if isinstance(timeout, timedelta):
            found.append(timeout)
    return max(found, default=None)


def _follow_timeout(host_group: Any, group: Any) -> None:
    """Before a wait on keel's gloo twin of ``group`` (`_host_group`): give the twin ``group``'s timeout when the loop
    changed it since (torchtitan's ``set_pg_timeouts`` after its first step). Nothing for a group that is its own
    host group."""
    if host_group is group:
        return
    timeout = _timeout_of(group)
    if timeout is None:
        return
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout  # private: imported where it is used

        if _timeout_of(host_group) != timeout:
            _set_pg_timeout(timeout, host_group)
    except Exception:  # torch's private setter moved or refused: the twin keeps the timeout it was made with
        return


def _entries(layout: list) -> list[tuple[int, str, str, int]]:
    """The layout's entries in order: (group, "s" scalar or "f" family, key, values)."""
    return [
        entry
        for g, (scalar_keys, families) in enumerate(layout)
        for entry in [*((g, "s", key, 1) for key in scalar_keys), *((g, "f", key, len(n)) for key, n in families)]
    ]


def _starts(layout: list) -> dict[tuple[int, str, str, int], int]:
    """Where each entry of the layout starts in its packed vector."""
    starts, offset = {}, 0
    for entry in _entries(layout):
        starts[entry] = offset
        offset += entry[3]
    return starts


def _layout_of(entries: list[tuple[int, str, str, int]], names_from: list) -> list:
    """A layout of ``entries``, in their order, in the groups of ``names_from``, whose families' names it takes."""
    return [
        (
            [e[2] for e in entries if e[0] == g and e[1] == "s"],
            [(e[2], dict(families)[e[2]]) for e in entries if e[0] == g and e[1] == "f"],
        )
        for g, (_, families) in enumerate(names_from)
    ]


class _Plan:
    """Index tensors for one packed layout: which entries are summed, squared, gathered; the output layout."""

    def __init__(self, layout: list, sharded: bool, world: int, with_grad_stats: bool, device: torch.device) -> None:
        summed, squared, gathered, is_max = [], [], [], []
        self.checksum = 0  # of the layout, set by RankSync._plan
        self.loss_index = self.grad_norm_index = -1
        offset = 0
        self.first_group_end = 0
        for g, (scalar_keys, families) in enumerate(layout):
            entries = [(k, 1) for k in scalar_keys] + [(k, len(names)) for k, names in families]
            for key, n in entries:
                rule = reduction_rule(key, sharded)
                if g == 0 and key == keys.LOSS:
                    self.loss_index = offset
                if g == 0 and key == keys.GRAD_NORM:
                    self.grad_norm_index = offset
                for i in range(offset, offset + n):
                    if rule in ("max", "min"):
                        gathered.append(i)
                        is_max.append(rule == "max")
                    else:
                        summed.append(i)
                        squared.append(rule == "norm")
                offset += n
            if g == 0:
                self.first_group_end = offset
        # `_reduce`'s buffer: the summed entries, then per rank its gathered entries, loss, gradient norm (and stats)
        self.size = len(summed) + world * (len(gathered) + 2 + (3 if with_grad_stats else 0))
        # Built once per layout, on the measurements' device, so indexing never copies from the host.
        self.summed = torch.tensor(summed, dtype=torch.long, device=device)
        self.squared = torch.tensor(squared, dtype=torch.bool, device=device)
        self.gathered = torch.tensor(gathered, dtype=torch.long, device=device)
        self.is_max = torch.tensor(is_max, dtype=torch.bool, device=device)
        names = tuple(str(r) for r in range(world))
        rank_families = [(keys.RANK_LOSS_PER_RANK, names), (keys.RANK_GRAD_NORM_PER_RANK, names)]
        if with_grad_stats:
            rank_families += [(keys.RANK_GRAD_LOCAL_NORM_PER_RANK, names), (keys.RANK_GRAD_COS_PER_RANK, names)]
        first_keys, first_families = layout[0] if layout else ([], [])
        self.layout = [(list(first_keys), [*first_families, *rank_families]), *layout[1:]]
