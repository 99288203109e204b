"""DataLedger: what each step's batch held, the examples a bad step is attributed to, and the skip list.

The loop says what a step trained on with ``guard.step(loss, batch_ids=..., batch=...)``. The ids go to the run
store (as ranges: a sequential batch is a few bytes) and stay in memory for the steps a rollback could discard.
The batch itself is held for this step only, by reference: nothing is computed on it unless the step raised a
spike, a non-finite value or a critical finding and the Guard has an `Attribution`; then each example's loss (and,
opt-in, gradient norm) is measured from the state before the update and the top offenders join the finding's
evidence. Under ``skip`` and ``recover`` the outliers (robust z above `Attribution.z`) — of a skipped step, and of a
spike the step trained on, so that later epochs and resumed runs leave them out — and every example of a window a
rollback steps past are written to ``run_dir/skip_list.json`` for `keel.data.SkipListSampler`; ``observe`` changes no
data and writes none.

Under torch.distributed every rank trains on its own batch, so its attribution names its own examples. The decisions
that follow stay the same on every rank: a spike carried by outliers on any rank skips the step on all of them (a
skip on one rank alone would leave the replicas' weights apart), and the skip list that rank 0 writes holds every
rank's outliers and every rank's ids of a rollback's window (gathered on those rare steps only). The per-step ids in
the run store are rank 0's.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import deque
from pathlib import Path
from typing import Any

from torch import nn

from keel._core.decision import Decision
from keel._core.example_ids import as_id_list
from keel._core.finding import Finding
from keel.data.skip_list import EntryKind, SkipEntry, SkipList
from keel.guard.distributed import RankSync
from keel.signals.attribution import (
    Attribution,
    batch_size,
    example_grad_norms,
    example_losses,
    rank_offenders,
    spike_floor,
)
from keel.store.reader import RunReader

SPIKE_KINDS = frozenset({"loss_spike", "grad_spike", "non_finite"})  # attributed at any severity, info included
NOT_THE_BATCH = frozenset({"lr_surge"})  # critical findings whose cause is not in the batch: never attributed
MIN_RECENT_STEPS = 1024  # steps whose ids stay in memory at least (8 bytes an id), for the windows rollbacks discard


class DataLedger:
    """The data side of a `Guard`: batch ids per step, attribution of bad steps, the skip list.

    Args:
        skip_list_dir: Where ``skip_list.json`` is written (the run directory on the rank that writes); None: no
            skip list is written.
        attribution: How to attribute a bad step to its examples; None: not at all.
        keep_steps: Steps whose ids stay in memory (at least `MIN_RECENT_STEPS`): as far back as a rollback can
            reach, so a rollback's window entry holds every id it discarded.
        ranks: The ranks of a torch.distributed job (None in one process): attributed skips are agreed and skipped
            ids gathered across them.
    """

    def __init__(
        self,
        skip_list_dir: str | Path | None,
        attribution: Attribution | None,
        keep_steps: int = MIN_RECENT_STEPS,
        ranks: RankSync | None = None,
    ) -> None:
        self.attribution, self.ranks = attribution, ranks
        self.skip_list = SkipList(skip_list_dir) if skip_list_dir is not None else None
        self.recent: deque[tuple[int, array[int]]] = deque(maxlen=max(keep_steps, MIN_RECENT_STEPS))
        self.ids: list[int] | None = None  # this step's
        self.batch: Any = None  # this step's, by reference

    def recall(self, store: str | Path, before: int) -> None:
        """At a resume from the snapshot of step ``before``: the ids of the steps before it that a rollback can still
        reach, from the run store (the process that trained them is gone, and its memory with it). A rollback after
        a resume to a snapshot from before it listed only the ids this process had seen: the skip list of a resumed
        run left out the steps 68–79 that the uninterrupted run's held (h28 R6)."""
        span = range(max(0, before - (self.recent.maxlen or 0)), before)
        with RunReader(store) as reader:
            kept = reader.batches(span)
        self.recent.extend((step, array("q", ids)) for step, ids in sorted(kept.items()))

    def note(self, step: int, batch_ids: Any, batch: Any) -> None:
        """This step's ids and batch (either may be None). Raises ValueError for ids that are not example ids."""
        self.ids = None if batch_ids is None else as_id_list(batch_ids)
        self.batch = batch
        if self.ids is not None:
            self.recent.append((step, array("q", self.ids)))

    def forget_batch(self) -> None:
        """Drop the reference to this step's batch (its tensors are the loop's to free)."""
        self.batch = None

    def attribute(self, model: nn.Module, findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
        """The findings, the ones that warrant it with the batch's top offenders in their evidence."""
        if self.attribution is None or self.batch is None or not any(map(_warrants, findings)):
            return findings
        offenders = self._offenders(model, findings)
        return tuple(
            dataclasses.replace(f, evidence={**f.evidence, **offenders}) if _warrants(f) else f for f in findings
        )

    def _offenders(self, model: nn.Module, findings: tuple[Finding, ...]) -> dict[str, Any]:
        assert self.attribution is not None
        size = batch_size(self.batch)
        ids = self.ids if self.ids is not None and len(self.ids) == size else list(range(size))
        config = self.attribution
        losses = example_losses(model, config.loss_fn, self.batch).tolist()
        # on a loss spike an outlier must carry a share of it (a healthy rank's heavy tail does not)
        floor = spike_floor(findings, examples=size * (self.ranks.world if self.ranks is not None else 1))
        ranked = rank_offenders(losses, ids, top_k=len(ids), z=config.z, floor=floor)  # every outlier, not top k
        found: dict[str, Any] = {
            "offenders": [o.to_json() for o in ranked[: config.top_k]],
            "outliers": [o.id for o in ranked if o.outlier],
            "offender_ids": "batch_ids" if ids is self.ids else "positions in the batch",
        }
        if config.grad_norms:
            norms, how = example_grad_norms(model, config.loss_fn, self.batch)
            ranked = rank_offenders(norms.tolist(), ids, top_k=config.top_k, z=config.z)
            found.update(offenders_by_grad_norm=[o.to_json() for o in ranked], grad_norms_by=how)
        return found

    def skip_if_attributed(self, decision: Decision, policy: str) -> Decision:
        """Under ``skip``/``recover``, a step the Guard would apply whose spike attribution pinned on outlier examples
        is skipped instead: the spike was theirs (a spike the detectors rate ``info`` — one step, below their
        critical ratio — is exactly a poisoned batch's). Other decisions are returned as they are. Under
        torch.distributed, outliers on any rank skip the step on every rank."""
        if policy == "observe" or decision.action != "ok":
            return decision
        spikes = [f for f in decision.findings if f.kind in SPIKE_KINDS]
        if not spikes:  # the same on every rank: the findings come from the ranks' reduced values
            return decision
        carried = [f for f in spikes if f.evidence.get("outliers")]
        ids = sorted({i for f in carried for i in f.evidence["outliers"]})
        if self.ranks is not None:
            ids = self.ranks.all_ids(ids)
        if not ids:
            return decision
        shown = ", ".join(map(str, ids[:8])) + (", …" if len(ids) > 8 else "")
        kinds = ", ".join(sorted({f.kind for f in carried or spikes}))
        return dataclasses.replace(
            decision,
            action="skip",
            reason=f"skipped update: the {kinds} is carried by outlier example(s) {shown} of the batch "
            f"(attribution, robust z > {self.attribution.z if self.attribution else '?'}); they are skip-listed",
        )

    def record_skips(self, decision: Decision) -> None:
        """Write what ``decision`` takes out of training from now on to the skip list: the outliers its findings were
        attributed to (skipped or trained on), and, for a rollback, every example of the steps it discarded. Under
        torch.distributed, every rank takes part (the ids are gathered) and rank 0 writes."""
        if any(_transient(f) for f in decision.findings):
            return  # a transient fault is not the data's
        attributed = self.attribution is not None and any(map(_warrants, decision.findings))  # alike on every rank
        if (self.skip_list is None and self.ranks is None) or not (attributed or decision.action == "rollback"):
            return
        step = decision.step
        outliers = sorted(
            {
                i
                for f in decision.findings
                if f.evidence.get("offender_ids") == "batch_ids"
                for i in f.evidence.get("outliers", ())
            }
        )
        if attributed and self.ranks is not None:
            outliers = self.ranks.all_ids(outliers)
        if outliers:
            kinds = ", ".join(sorted({f.kind for f in decision.findings if _warrants(f)}))
            outcome = "trained on at this step" if decision.stepped else f"update {decision.action}"
            self._add("examples", step, step, outliers, f"{kinds} at step {step}: the batch's outliers ({outcome})")
        if decision.action == "rollback" and decision.restored_step is not None:
            first = decision.restored_step
            window = sorted({i for s, ids in self.recent if first <= s <= step for i in ids})
            if self.ranks is not None:
                window = self.ranks.all_ids(window)
            reason = f"rollback at step {step} to the snapshot of step {first}: {decision.reason}"
            if self.recent and self.recent[0][0] > first:  # older than the ids kept in memory
                reason += f" (ids of steps {first}-{self.recent[0][0] - 1} no longer kept: not listed)"
            self._add("window", first, step, window, reason)

    def _add(self, kind: EntryKind, first: int, last: int, ids: list[int], reason: str) -> None:
        if ids and self.skip_list is not None:
            self.skip_list.add(SkipEntry(kind=kind, first_step=first, last_step=last, ids=tuple(ids), reason=reason))


def _transient(finding: Finding) -> bool:
    replay = finding.evidence.get("replay")
    return isinstance(replay, dict) and replay.get("reproducible") is False


def _warrants(finding: Finding) -> bool:
    # Every spike, info ones too: a batch with a few poisoned examples spikes the gradient norm by an order of
    # magnitude, which the spike detectors rate info (one step, no alarm) unless it reaches their critical ratio —
    # `keel bench data`'s poisoned batches reached 16.5x, the critical ratio is 20x. Not an LR surge: the learning
    # rate, not the batch, is at fault (its batch's ordinary outliers went to the skip list).
    return finding.kind not in NOT_THE_BATCH and (finding.severity == "critical" or finding.kind in SPIKE_KINDS)
