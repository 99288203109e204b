"""OLMo stdout logs: allenai/OLMo's ``scripts/train.py`` (v1) and OLMo-core's trainer.

Both print each logged step as a header line, then one indented ``name=value`` line per metric::

    2024-02-01 10:00:00.000  node:0  olmo.train:816  INFO  [step=10/739328]
        train/CrossEntropyLoss=7.562
        train/Perplexity=1,925
        optim/total_grad_norm=1.234
        throughput/device/tokens_per_second=9,876

(OLMo-core: ``[step=10/1000,epoch=1,eta=2h3m]`` then ``train/CE loss=7.562``, ``optim/total grad norm=1.234``,
``optim/LR (group 0)=3.00E-04``; forks: ``[step=10/1000, eta=1 hour, 2 minutes]``). Values over 1000 have thousands
commas, dropped here (``1,925`` → 1925); names keep their own spelling and `keel.doctor.columns` maps the loss,
gradient norm and learning rate of both (OLMo's console leaves out ``optim/*`` but the gradient norm: no learning
rate there). A block under any other header is an evaluation (OLMo's ``<evaluator label>`` header, OLMo-core's
``Finished lm evals in 12.3 seconds. Metrics:``): its metrics belong to the step logged last, named ``eval/...`` as
the trainers record them. A colouring log handler's ANSI codes are skipped. A block before the first step
(``Pre-train system metrics``) has no step and is left out, as are the lines that are not ``name=value`` lines (the
banner, the eval speed summary), counted in a note. A step's indented line that is not ``name=value`` is one error
that names it. OLMo-core's ``optim/step skipped=1.0000`` (its SkipStepOptimizer left that update out) is also the
run's own skip: a `Decision` by ``"trainer"``, listed by ``keel doctor`` and marked in ``keel report``.
"""

from __future__ import annotations

import re
from pathlib import Path

from keel._core import keys
from keel._core.decision import Actor, Decision
from keel.doctor._text import read_lines, strip_ansi
from keel.doctor.jsonl_log import Entries, add_entry
from keel.doctor.log import LogReadError, RawLog, malformed_line
from keel.doctor.table import LogTable

FORMAT = "olmo"
# the header's bracket is at the end of its line; bounded so that a long line is matched in linear time
_HEADER = re.compile(r"\[step=(\d{1,18})/(?:\d{1,18}|\?\?\?)(?:,[^\]\n]{0,200})?\]\s*")
_SEARCH = re.compile(
    r"\[step=\d{1,18}/(?:\d{1,18}|\?\?\?)(?:,[^\]\n]{0,200})?\][ \t]*\r?\n[ \t]+[^\s=][^=\n]{0,200}=[ \t]*\S"
)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+")
EVAL_PREFIX = keys.EVAL_PER_NAME
# OLMo-core's SkipStepOptimizer (SkipStepAdamW, SkipStepLion) logs 1 - its step factor: 1.0 at a step it left out
SKIPPED = "optim/step skipped"
TRAINER: Actor = "trainer"  # a skip the trainer made itself, not keel nor a GradScaler
SKIP_REASON = (
    "OLMo-core's SkipStepOptimizer left out this update (the loss or gradient norm was over its rolling mean + "
    "sigma_factor x std): optim/step skipped={value:g}"
)


def looks_like_olmo(text: str) -> bool:
    """Whether ``text`` holds a ``[step=N/MAX]`` header followed by an indented ``name=value`` line."""
    if "[step=" not in text:  # a fast answer for the JSON and CSV logs that detection tries this on
        return False
    return _SEARCH.search(strip_ansi(text)) is not None


def read_olmo_log(path: str | Path) -> RawLog:
    """Read an OLMo or OLMo-core stdout log.

    Raises:
        LogReadError: An indented line under a ``[step=N/MAX]`` header that is not ``name=value`` (named by its
            number), or no step with a metric at all.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("INFO [step=1/100]\\n    train/CrossEntropyLoss=11.05\\n    train/Perplexity=63,532\\n")
        >>> list(read_olmo_log(p).records)
        [(1, {'train/CrossEntropyLoss': 11.05, 'train/Perplexity': 63532.0})]
    """
    path = Path(path)
    entries = Entries()
    step: int | None = None  # the step logged last
    in_step = False  # reading the block under a [step=N/MAX] header (else an evaluation's, or none)
    other_lines = 0
    text = read_lines(path)
    for number, line in enumerate(text.lines, start=1):
        if line[:1] in (" ", "\t") and line.strip():
            metric = _metric(line)
            if in_step and metric is None:
                if text.cut_off(number):
                    break
                raise _malformed(path, number, line)
            if metric is None or step is None:  # not a metric, or a block before the first step
                other_lines += 1
                continue
            name, value = metric
            if not in_step and not name.startswith(EVAL_PREFIX):
                name = EVAL_PREFIX + name
            add_entry(entries, step, {name: value})  # the lines of one block make one entry
            continue
        header = _header(line)
        in_step = header is not None
        if header is not None:
            step = header
        elif line.strip():
            other_lines += 1
    if not entries:
        raise LogReadError(f"{path}: no '[step=N/MAX]' line followed by indented 'name=value' lines (OLMo)")
    log = entries.log(path, fmt=FORMAT)
    text.note(log.notes)
    log.decisions = _trainer_skips(log.records)
    if other_lines:
        log.notes.append(
            f"{other_lines} lines that are not step headers nor name=value lines (the banner, evaluation headers) "
            "left out"
        )
    return log


def _trainer_skips(records: LogTable) -> list[Decision]:
    """A ``skip`` decision by the trainer at each step whose ``optim/step skipped`` is above 0 and at most 1 (the
    share of the step's updates left out); another value (NaN, negative, text) is no skip."""
    column = records.columns.get(SKIPPED)
    if column is None:
        return []
    skipped = (column.values > 0) & (column.values <= 1)
    return [
        Decision(step=int(records.steps[row]), action="skip", by=TRAINER, reason=SKIP_REASON.format(value=value))
        for row, value in zip(column.rows[skipped].tolist(), column.values[skipped].tolist(), strict=True)
    ]


def _header(line: str) -> int | None:
    """The step of a ``[step=N/MAX]`` header line, or None."""
    start = line.rfind("[step=")
    m = _HEADER.fullmatch(line, start) if start >= 0 else None
    return int(m.group(1)) if m else None


def _metric(line: str) -> tuple[str, str] | None:
    name, equals, value = line.strip().rpartition("=")
    name, value = name.strip(), value.strip()
    if not equals or not name or not value or "=" in name:
        return None
    return name, value.replace(",", "") if _THOUSANDS.fullmatch(value) else value


def _malformed(path: Path, number: int, line: str) -> LogReadError:
    return malformed_line(path, number, line, "under a '[step=N/MAX]' header is not 'name=value' (OLMo)")
