"""Console: what keel says while a run trains — a ``keel`` log line per warning, critical and decision, rate-limited,
and one summary when the run closes.

Every line goes to ``logging.getLogger("keel")``, at a level that says how much it matters:

| what | level |
|---|---|
| an ``info`` finding, a GradScaler's own overflow skip | DEBUG (quiet by default) |
| the run's summary at `Guard.close` | INFO |
| a ``warning`` finding, a skipped update, a rollback | WARNING |
| a ``critical`` finding, an abort | ERROR |

Where it shows: an application that configured logging (a handler on the root or on ``keel``) gets keel's
lines through its own handlers and levels. Otherwise — a plain script — keel adds one handler of its own to the
``keel`` logger the first time it speaks, writing to ``sys.stderr`` at level INFO, so a critical finding is never
silent. To silence keel, or send it elsewhere, use the ordinary logging calls::

    logging.getLogger("keel").setLevel(logging.ERROR)        # only criticals and aborts
    logging.getLogger("keel").setLevel(logging.CRITICAL + 1)  # nothing
    logging.getLogger("keel").addHandler(logging.FileHandler("keel.log"))  # elsewhere (then keel adds none)

The rate limit keeps a noisy run from flooding the console: of each finding kind (and of skips), the first
`ConsoleConfig.first_lines` lines are shown; later ones are counted, and a line every `ConsoleConfig.note_every`
steps says how many were not shown. Rollbacks and aborts are always shown; every finding and decision, shown or
not, is in the run store and in the summary's counts. Under ``torch.distributed`` only rank 0 speaks (every rank
takes the same decisions).

Long work (``keel demo``, ``keel sweep``, ``keel bench``) shows its progress with `progress_bar` (tqdm, on stderr
and only on a terminal, so ``--json`` output stays clean), keel's lines printed above the bar rather than through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from keel._core.decision import Decision
from keel._core.finding import Finding
from keel._core.printable import one_line
from keel._core.progress import progress_bar as plain_progress_bar
from keel.detect.diagnosis import Diagnosis
from keel.guard.summary import LEVELS, advice_in_force, format_summary, plural

LOGGER_NAME = "keel"

logger = logging.getLogger(LOGGER_NAME)
_SILENCED: contextvars.ContextVar[bool] = contextvars.ContextVar("keel_console_silenced", default=False)


@dataclass(kw_only=True)
class ConsoleConfig:
    """How much keel says per run.

    Attributes:
        first_lines: Lines shown of each finding kind (and of skips) before further ones are only counted.
        note_every: Steps between two lines that say how many lines of one kind were not shown.
        width: Characters at most of a cause, the advice or a reason on a line (longer ones end in "…").
    """

    first_lines: int = 3
    note_every: int = 100
    width: int = 140

    def __post_init__(self) -> None:
        for name, low in (("first_lines", 0), ("note_every", 1), ("width", 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ConsoleConfig.{name}={value!r}; allowed: an int >= {low}")


@dataclass
class _Hidden:
    """Lines of one kind not shown since ``since``, by severity (or action), and the highest level among them."""

    since: int = -1
    level: int = logging.DEBUG
    by: Counter[str] = field(default_factory=Counter)


class Console:
    """The voice of one run: turns its findings and decisions into rate-limited ``keel`` log lines.

    Args:
        config: The rate limit and line width.
        quiet: Say nothing (ranks other than 0 under ``torch.distributed``).

    Example:
        >>> Console().step(Decision(step=5, action="skip", reason="skipped update: NaN gradients"))
    """

    def __init__(self, config: ConsoleConfig | None = None, *, quiet: bool = False) -> None:
        self.config = config or ConsoleConfig()
        self._quiet = quiet
        self._shown: Counter[str] = Counter()
        self._hidden: dict[str, _Hidden] = {}
        self.hidden_total = 0
        self.policy: str | None = None  # the run's policy: advice that names it says keel does it (`advice_in_force`)

    @property
    def quiet(self) -> bool:
        """Whether this console says nothing: a rank other than 0, inside `silenced`, or after `stop`."""
        return self._quiet or _SILENCED.get()

    def stop(self) -> None:
        """Say nothing more (the console itself failed: the `Recorder` records that as a ``keel_error``)."""
        self._quiet = True

    def step(self, decision: Decision) -> None:
        """The lines of one step: each finding, then the decision unless it is a plain ``"ok"``."""
        if self.quiet:
            return
        for finding in decision.findings:
            self.finding(finding)
        if decision.action != "ok":
            self.decision(decision)

    def finding(self, f: Finding) -> None:
        level = LEVELS[f.severity]
        if self.quiet or not _enabled(level):
            return
        signal = one_line(str(f.signal), 60) + _value(f.value)
        text = f"step {f.step} {one_line(str(f.kind), 60)} {f.severity} ({signal}){_offenders(f.evidence)}"
        if f.cause:
            text += f": {one_line(str(f.cause), self.config.width)}"
        if f.advice:
            text += f" — advice: {one_line(advice_in_force(str(f.advice), self.policy), self.config.width)}"
        self._limited(one_line(str(f.kind), 60), f.severity, f.step, level, text)

    def decision(self, d: Decision) -> None:
        if self.quiet:
            return
        reason = one_line(str(d.reason), 2 * self.config.width)
        if d.action in ("rollback", "abort"):  # always shown: each changes the run for good
            moved = f" from step {d.step} to step {d.restored_step}" if d.restored_step is not None else ""
            _say(
                logging.WARNING if d.action == "rollback" else logging.ERROR,
                f"step {d.step} {d.action}{moved}: {reason}",
            )
        elif d.action == "skip":
            level = logging.DEBUG if d.by == "scaler" else logging.WARNING
            if _enabled(level):
                by = " by the GradScaler" if d.by == "scaler" else ""
                self._limited(
                    "skip" if d.by == "keel" else "scaler skip",
                    "skip",
                    d.step,
                    level,
                    f"step {d.step} skip{by}: {reason}",
                )

    def flush(self) -> None:
        """Say how many lines of each kind were not shown since its last note (at the end of a run)."""
        for key in list(self._hidden):
            self._note(key, None)

    def summary(
        self,
        *,
        status: str,
        steps: int,
        policy: str | None,
        findings: Sequence[Finding],
        decisions: Sequence[Decision],
        diagnoses: Sequence[Diagnosis],
        run_dir: str | None,
        failures: Mapping[str, int] | None = None,
    ) -> None:
        """The run's summary, one INFO block (pending rate-limit notes first)."""
        if self.quiet:
            return
        self.flush()
        if _enabled(logging.INFO):
            _say(
                logging.INFO,
                format_summary(
                    status=status,
                    steps=steps,
                    policy=policy,
                    findings=findings,
                    decisions=decisions,
                    diagnoses=diagnoses,
                    run_dir=run_dir,
                    hidden=self.hidden_total,
                    failures=failures,
                ),
            )

    # --- the rate limit -------------------------------------------------------------------------------
    def _limited(self, key: str, severity: str, step: int, level: int, text: str) -> None:
        self._shown[key] += 1
        if self._shown[key] <= self.config.first_lines:
            _say(level, text)
            return
        hidden = self._hidden.setdefault(key, _Hidden(since=step))
        hidden.by[severity] += 1
        hidden.level = max(hidden.level, level)
        self.hidden_total += 1
        if step - hidden.since >= self.config.note_every:
            self._note(key, step)

    def _note(self, key: str, step: int | None) -> None:
        hidden = self._hidden.pop(key)
        n = sum(hidden.by.values())
        by = ", ".join(f"{s} {c}" for s, c in sorted(hidden.by.items()))
        at = f"step {step}: " if step is not None else "end of run: "
        _say(
            hidden.level,
            f"{at}{n} more {key} {plural(n, 'line')} since step {hidden.since} not shown ({by}); all "
            "are in the run store and the summary",
        )


def _value(value: object) -> str:
    """`` = <value>`` for a finding's value; nothing when it is NaN (not applicable)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f" = {one_line(repr(value), 40)}"
    return "" if number != number else f" = {number:.4g}"


def _offenders(evidence: dict[str, Any]) -> str:
    """`` [examples 486, 17]``: the outliers a bad step was attributed to (`keel.Attribution`), if any."""
    offenders = evidence.get("offenders")
    found = [o for o in offenders if isinstance(o, dict) and o.get("outlier")] if isinstance(offenders, list) else []
    if not found:
        return ""
    ids = ", ".join(one_line(str(o.get("id")), 20) for o in found[:5])
    return f" [example{'s' if len(found) > 1 else ''} {ids}{', …' if len(found) > 5 else ''}]"


# --- where the lines go -------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """keel's own handler: ``sys.stderr`` as it is when a line is written (a redirection made later is honoured)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.set_level = False  # whether keel set the logger's level to INFO when it added this handler
        self.setFormatter(logging.Formatter(f"{LOGGER_NAME}: %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def _own_handler() -> _StderrHandler | None:
    return next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)


def ensure_handler() -> None:
    """Add keel's stderr handler when nothing would show its lines (no handler on ``keel`` or the root).

    Called before each line at INFO or above; an application that configures logging later takes over (keel's
    handler is removed, so no line is printed twice).
    """
    own = _own_handler()
    if own is not None:
        if logging.getLogger().handlers:
            logger.removeHandler(own)
            if own.set_level and logger.level == logging.INFO:
                logger.setLevel(logging.NOTSET)  # the application's levels apply again
        return
    if logger.hasHandlers():
        return
    own = _StderrHandler()
    # the root's WARNING would hide the summary; a level the user set stays
    own.set_level = logger.level == logging.NOTSET
    logger.addHandler(own)
    if own.set_level:
        logger.setLevel(logging.INFO)


def _enabled(level: int) -> bool:
    if level >= logging.INFO and (logger.level == logging.NOTSET or logger.level <= level):  # not when silenced
        ensure_handler()
    return logger.isEnabledFor(level)


def _say(level: int, text: str) -> None:
    logger.log(level, text)


def speaks() -> bool:
    """False on ranks other than 0 under ``torch.distributed``: every rank takes the same decisions, one says them."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No ``keel`` lines from the runs inside (a sweep or a benchmark, whose own output summarises its runs).

    It holds for this thread (a context variable): a run trained beside it, in another thread, still speaks, and
    the ``keel`` logger's level is left as the application set it.

    Example:
        >>> with silenced():
        ...     Console().step(Decision(step=1, action="abort", reason="not shown"))
    """
    token = _SILENCED.set(True)
    try:
        yield
    finally:
        _SILENCED.reset(token)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it") -> Iterator[Any]:
    """`keel._core.progress.progress_bar`, with keel's own console handler writing through the bar while it runs
    (``tqdm.write``), so a log line never breaks it.

    Example:
        >>> with progress_bar(3, "repeats", enabled=False) as bar:
        ...     for _ in range(3):
        ...         bar.update()
    """
    from tqdm.contrib.logging import logging_redirect_tqdm  # imported here: a training loop never needs it

    ensure_handler()
    redirect = logging_redirect_tqdm(loggers=[logger]) if _own_handler() is not None else contextlib.nullcontext()
    with redirect, plain_progress_bar(total, desc, enabled=enabled, unit=unit) as bar:
        yield bar
