"""Recorder: keeps a run's findings and decisions in memory and writes them, with its signals, to the run store.

At close it also names the run's causes (`keel.detect.diagnose` on the findings and the loss curve) and stores
them as the ``diagnosis`` meta entry, so a store says what went wrong, when it was first seen and how early.
What it records it also says on the ``keel`` logger (`keel.guard.console`): a line per warning, critical and
decision as they happen, rate-limited, and a summary at close.
"""

from __future__ import annotations

import time
import traceback
import warnings
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed

from keel._core.decision import Decision
from keel._core.errors import KeelWarning
from keel._core.finding import Finding
from keel._core.keys import LOSS
from keel._core.observation import Observation
from keel.detect.diagnosis import Diagnosis, diagnose
from keel.guard.console import Console, ConsoleConfig, speaks
from keel.store import RunWriter

# Within a preemption's grace period (SLURM's KillWait and Kubernetes' default are 30 s); a flush takes milliseconds.
FLUSH_ON_SIGNAL_S = 10.0


# a collective's error when the rank at the other end is gone (gloo's and NCCL's words for a dropped connection), or
# did not come before the process group's timeout (gloo's and NCCL's words; keel's own after one such failure)
_PEER_LOST_WORDS = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "connection refused",
    "timed out waiting",  # gloo: "Timed out waiting 1800000ms for recv operation to complete"
    "application timeout caused pair closure",  # gloo, on the late rank's side
    "watchdog caught collective operation timeout",  # NCCL
    "keel's collectives stopped after one failed",  # keel.guard.distributed, after the first of these
)
PEER_LOST = (
    "Another rank stopped, or did not reach this collective before the process group's timeout (hung, or too slow: "
    "a stuck dataloader, a rank-only eval or checkpoint, a slow file system), while this one waited in it: nothing "
    "here is keel's to fix, and the loop's own next collective fails too. Look at the other ranks' logs for where "
    "they stopped. torchrun --max-restarts (or the job's scheduler) starts the job again; Guard(resume=True) "
    "continues it from the newest disk snapshot every rank holds."
)


def a_peer_was_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (torch's network error, or gloo's
    and NCCL's words for a dropped connection), not keel's own error."""
    network_error = getattr(torch.distributed, "DistNetworkError", None)
    if network_error is not None and isinstance(exc, network_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _PEER_LOST_WORDS)


class Recorder:
    """The write side of a `Guard`: in-memory lists plus the run store when there is a ``run_dir``.

    Attributes:
        findings: Every finding of the run.
        decisions: Every decision that was not a plain ``"ok"``.
        diagnoses: The named causes of the findings, set at `close` (empty for a clean run).
    """

    def __init__(self, run_dir: str | None, log_every: int, console: ConsoleConfig | None = None) -> None:
        self.writer = RunWriter(run_dir) if run_dir is not None else None
        self.run_dir = run_dir
        self.console = Console(console, quiet=not speaks())
        self.policy: str | None = None  # from the run's meta, for the summary
        self._console_failed = False
        self.log_every = log_every
        self.findings: list[Finding] = []
        self.decisions: list[Decision] = []
        self.diagnoses: list[Diagnosis] = []
        # the loss of steps 0, 1, 2, … (8 bytes a step): when the loss degraded, for the lead time; a gap or a
        # resumed run (first step not 0) ends it, and the diagnosis then goes without lead times
        self._losses = array("d")
        self._losses_whole = True
        self.interrupted: str | None = None  # "SIGTERM after 120 steps": a signal arrived (`keel.guard.run_end`)
        self._interrupted_at = 0  # the steps done when it arrived

    def meta(self, items: dict[str, Any]) -> None:
        self.policy = self.console.policy = items.get("policy", self.policy)
        if self.writer is not None:
            self.writer.set_meta(items)

    def step(self, obs: Observation, decision: Decision) -> None:
        """Record one step: its signals (per-parameter ones on ``log_every`` and non-finite steps), findings
        and, unless it is a plain ``"ok"``, its decision."""
        self.findings.extend(decision.findings)
        if self._losses_whole:
            if LOSS in obs.values and obs.step == len(self._losses):
                self._losses.append(float(obs.values[LOSS]))
            else:
                self._losses_whole = False
        if decision.action != "ok":
            self.decisions.append(decision)
        if self.writer is not None:
            self._write(obs, decision)
        if decision.findings or decision.action != "ok":
            self._speak(obs.step, self.console.step, decision)

    def batch(self, step: int, ids: list[int]) -> None:
        """The example ids of the step's batch, to the store."""
        if self.writer is not None:
            self.writer.add_batch(step, ids)

    def _write(self, obs: Observation, decision: Decision) -> None:
        assert self.writer is not None
        values = dict(obs.values)
        if obs.step % self.log_every == 0 or any(f.kind == "non_finite" for f in decision.findings):
            for family in obs.per_param:
                values.update(obs.expand(family))
        self.writer.add_signals(obs.step, values)
        self.writer.add_findings(decision.findings)
        if decision.action != "ok":
            self.writer.add_decision(decision)

    def late(self, obs: Observation) -> None:
        """Record signals measured after a step's update (they reach the host with the next step)."""
        if self.writer is None:
            return
        values = dict(obs.values)
        for family in obs.per_param:
            values.update(obs.expand(family))
        self.writer.add_signals(obs.step, values)

    def evaluation(self, obs: Observation, findings: list[Finding]) -> None:
        """Record an eval round (`keel.guard.evaluation`): its signals at its step, and what detectors found in it."""
        self.findings.extend(findings)
        if self.writer is not None:
            self.writer.add_signals(obs.step, obs.values)
            self.writer.add_findings(findings)
        for finding in findings:
            self._speak(obs.step, self.console.finding, finding)

    def error(self, component: str, step: int, exc: BaseException, *, disabled: bool = True) -> Finding:
        """Record an error inside keel as a ``keel_error`` finding (``disabled``: the component was switched off)."""
        what = (
            "It is disabled for the rest of the run; the rest of keel goes on."
            if disabled
            else "That step went on as the bare loop would; each later step tries again (reported once)."
        )
        finding = Finding(
            step=step,
            kind="keel_error",
            severity="warning",
            signal=component,
            evidence={
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)),
            },
            cause=f"keel's {component} raised {type(exc).__name__}: {exc}. {what}",
            advice=PEER_LOST
            if a_peer_was_lost(exc)
            else "Training continues. If the component is keel's own, please "
            "report this as a keel bug with the traceback; if it is yours, fix it and restart.",
        )
        self.findings.append(finding)
        if self.writer is not None:
            self.writer.add_findings([finding])
        self._speak(step, self.console.finding, finding)
        return finding

    def _speak(self, step: int, say: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """A console line; a console that fails is stopped and recorded, and the run and its store go on."""
        if self._console_failed:
            return
        try:
            say(*args, **kwargs)
        except Exception as exc:
            self._console_failed = True
            self.console.stop()
            self.error("console", step, exc)

    def snapshot(self, step: int, path: str, checksum: str) -> None:
        if self.writer is not None:
            self.writer.add_snapshot(step, path, checksum)

    def resumed(self, start: int, *, stored: int, source: str = "resume=True: the newest disk snapshot") -> None:
        """A resume from the state of step ``start`` (``source``: keel's snapshot, or a trainer's checkpoint): drop
        the store's rows of the steps done again, and say which steps stay missing when the store holds fewer
        (``stored``) — a SIGKILL loses the rows of up to its last ``flush_interval`` while a disk snapshot of one of
        those steps is already written."""
        assert self.writer is not None
        self.writer.drop_from(start)
        self.meta({"resumed_from": start})
        if stored < start:
            missing = [stored, start - 1]
            self.meta({"missing_steps": missing})
            warnings.warn(
                f"{source} is of step {start} and the run store holds {stored} steps: "
                f"the rows of steps {stored}–{start - 1} were lost when the process was killed before they were "
                "written (SIGKILL, the OOM killer); training continues from that state, those rows stay missing "
                "(meta missing_steps)",
                KeelWarning,
                stacklevel=4,
            )

    def signal(self, name: str, steps: int) -> None:
        """A signal arrived (SIGTERM, SIGINT): say so in the store and flush it, as the process may end next.

        Called from the signal handler, in the main thread between two bytecodes of the loop: it only enqueues
        rows and waits for the writer thread, so it is safe wherever the loop was.
        """
        self.interrupted, self._interrupted_at = f"{name} after {steps} steps", steps
        if self.writer is not None:
            self.writer.set_meta({"interrupted": self.interrupted, "status": f"interrupted by {self.interrupted}"})
            self.writer.set_meta({"steps": steps, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.writer.flush(timeout=FLUSH_ON_SIGNAL_S)

    def diagnose(self) -> list[Diagnosis]:
        """Named causes of the findings so far; with lead times when the losses cover steps 0…n-1."""
        whole = self._losses_whole and len(self._losses) > 0
        return diagnose(self.findings, losses=self._losses.tolist() if whole else None)

    def close(self, status: str, steps: int, failures: Mapping[str, int] | None = None) -> None:
        """Name the run's causes, say the summary on the console, and flush and close the store.

        ``failures``: the steps each part of keel that is tried again on every step failed on
        (`Components.failures`): said in the summary and kept in the store's meta as ``keel_errors``.

        After a signal, a run that ends by anything but keel's own ``"aborted"`` (the KeyboardInterrupt of a
        SIGINT, an exit, a loop that stopped early at its own SIGTERM handler's word and closed) is ``interrupted
        by <signal> after <n> steps``: the signal is what ended it; ``steps`` says where it closed. A run that trained
        on past the step the signal came in (a caught KeyboardInterrupt in a notebook, then the next cell) was not
        ended by it: it keeps its own status (the ``interrupted`` entry stays).
        """
        went_on = self.interrupted is not None and steps > self._interrupted_at + 1  # +1: the step in flight
        if self.interrupted is not None and status != "aborted" and not went_on:
            status = f"interrupted by {self.interrupted}"
        try:
            self.diagnoses = self.diagnose()
        except Exception as exc:  # a diagnosis bug must not lose the run's store
            self.error("diagnosis", steps, exc)
        # before the store closes: a console that fails here is still recorded in it
        self._speak(
            steps,
            self.console.summary,
            status=status,
            steps=steps,
            policy=self.policy,
            findings=self.findings,
            decisions=self.decisions,
            diagnoses=self.diagnoses,
            run_dir=self.run_dir,
            failures=failures,
        )
        if self.writer is not None:
            self.writer.set_meta({"diagnosis": [d.to_dict() for d in self.diagnoses]})
            if failures:
                self.writer.set_meta({"keel_errors": dict(failures)})
            self.writer.set_meta(
                {"status": status, "steps": steps, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            )
            self.writer.close()
