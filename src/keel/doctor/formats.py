"""Which reader a path needs: by what the folder holds, the file's name and suffix, then its first bytes; and
which logs a folder stands for (`find_logs`: a folder of keel runs stands for each of them)."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

from keel._core.printable import printable
from keel.doctor._text import read_console, read_head
from keel.doctor.composer_log import FORMAT as COMPOSER
from keel.doctor.composer_log import looks_like_composer, read_composer_log
from keel.doctor.csv_log import read_csv_log
from keel.doctor.deepspeed_log import FORMAT as DEEPSPEED
from keel.doctor.deepspeed_log import looks_like_deepspeed, read_deepspeed_log
from keel.doctor.fairseq_log import FORMAT as FAIRSEQ
from keel.doctor.fairseq_log import looks_like_fairseq, read_fairseq_log
from keel.doctor.hf_console_log import FORMAT as HF_CONSOLE
from keel.doctor.hf_console_log import looks_like_hf_console, read_hf_console_log
from keel.doctor.hf_log import STATE_NAME, find_trainer_state, read_trainer_state
from keel.doctor.jsonl_log import read_jsonl_log
from keel.doctor.log import LogReadError, RawLog
from keel.doctor.maxtext_log import FORMAT as MAXTEXT
from keel.doctor.maxtext_log import looks_like_maxtext, read_maxtext_log
from keel.doctor.megatron_log import FORMAT as MEGATRON
from keel.doctor.megatron_log import looks_like_megatron, read_megatron_log
from keel.doctor.mlflow_log import db_run_path, db_runs, is_mlflow_db, mlflow_runs, read_mlflow_log
from keel.doctor.nanogpt_log import FORMAT as NANOGPT
from keel.doctor.nanogpt_log import looks_like_nanogpt, read_nanogpt_log
from keel.doctor.olmo_log import FORMAT as OLMO
from keel.doctor.olmo_log import looks_like_olmo, read_olmo_log
from keel.doctor.speedrun_log import FORMAT as SPEEDRUN
from keel.doctor.speedrun_log import looks_like_speedrun, read_speedrun_log
from keel.doctor.step_fields_log import FORMAT as STEP_FIELDS
from keel.doctor.step_fields_log import looks_like_step_fields, read_step_fields_log
from keel.doctor.step_lines_log import FORMAT as STEP_LINES
from keel.doctor.step_lines_log import LOG_NAMES, find_step_lines, looks_like_step_lines, read_step_lines_log
from keel.doctor.store_log import SQLITE_MAGIC, is_sqlite, read_store_log
from keel.doctor.tensorboard_log import EVENT_GLOB, is_event_file, read_tensorboard_log
from keel.doctor.torchtitan_log import FORMAT as TORCHTITAN
from keel.doctor.torchtitan_log import looks_like_torchtitan, read_torchtitan_log
from keel.doctor.tqdm_log import FORMAT as TQDM
from keel.doctor.tqdm_log import looks_like_tqdm_postfix, read_tqdm_log
from keel.doctor.verl_log import FORMAT as VERL
from keel.doctor.verl_log import looks_like_verl, read_verl_log
from keel.doctor.wandb_log import RUN_FILE_GLOB, is_wandb_file, read_wandb_log, wandb_runs
from keel.store import STORE_NAME, find_runs
from keel.store.sweep_schema import sweep_given_as_run

READERS: dict[str, Callable[[Path], RawLog]] = {
    "csv": read_csv_log,
    "jsonl": read_jsonl_log,
    "tensorboard": read_tensorboard_log,
    "hf_trainer_state": read_trainer_state,
    "keel_store": read_store_log,
    "wandb": read_wandb_log,
    "mlflow": read_mlflow_log,
    STEP_LINES: read_step_lines_log,
    SPEEDRUN: read_speedrun_log,
    MEGATRON: read_megatron_log,
    NANOGPT: read_nanogpt_log,
    FAIRSEQ: read_fairseq_log,
    TORCHTITAN: read_torchtitan_log,
    OLMO: read_olmo_log,
    HF_CONSOLE: read_hf_console_log,
    STEP_FIELDS: read_step_fields_log,
    COMPOSER: read_composer_log,
    VERL: read_verl_log,
    MAXTEXT: read_maxtext_log,
    TQDM: read_tqdm_log,
    DEEPSPEED: read_deepspeed_log,
}
FORMATS: tuple[str, ...] = tuple(READERS)


def read_log(path: str | Path, format: str | None = None) -> RawLog:
    """Read any supported training log.

    Args:
        path: A CSV/TSV, JSONL or JSON file, a Trainer ``trainer_state.json`` (or its checkpoint folder), a
            TensorBoard event file or folder, a keel run store (its folder or ``run.sqlite``), a W&B run (its
            ``run-<id>.wandb`` or run folder), or an MLflow run (a file-store run folder, an ``mlflow.db`` or
            ``mlflow.db/<run id>``).
        format: Force a reader (one of `FORMATS`) instead of detecting it.

    Returns:
        The `RawLog`.

    Raises:
        LogReadError: The path is missing, the format is unknown or the content is not a usable log.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
        >>> _ = p.write_text("step,loss\\n0,2.5\\n1,2.4\\n")
        >>> list(read_log(p).records)
        [(0, {'loss': 2.5}), (1, {'loss': 2.4})]
    """
    if isinstance(path, str) and not path.strip():
        # Path("") is the current folder: reading it would examine whatever happens to be there.
        raise LogReadError(f"path={path!r}: an empty path; give a log file or a folder")
    path = Path(path)
    if format is not None and format not in READERS:
        raise LogReadError(f"format={format!r}; allowed: {', '.join(FORMATS)}")
    if format in (None, "mlflow") and db_run_path(path) is not None:
        return read_mlflow_log(path)  # mlflow.db/<run id>: one run of a database, as find_logs names it
    if not path.exists():
        raise LogReadError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        # A FIFO would block the read forever, a device would never end: only files and folders are logs.
        raise LogReadError(f"{path}: not a regular file or folder ({_kind(path)}); give a log file or a folder")
    try:
        return READERS[format or detect_format(path)](path)
    except OSError as exc:
        raise LogReadError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def detect_format(path: Path) -> str:
    """The name of the reader for ``path`` (a key of `READERS`); `LogReadError` when none fits."""
    if path.is_dir():
        if (path / STORE_NAME).is_file():
            return "keel_store"
        if find_trainer_state(path) is not None:
            return "hf_trainer_state"
        # before TensorBoard: a run folder may hold event files exported from its store (RUN/export/tensorboard)
        if find_runs(path):
            return "keel_store"
        if wandb_runs(path):  # before TensorBoard: W&B's history is whole, a synced TensorBoard copy may not be
            return "wandb"
        if mlflow_runs(path):
            return "mlflow"
        if next(path.rglob(EVENT_GLOB), None) is not None:
            return "tensorboard"
        if find_step_lines(path) is not None:
            return STEP_LINES
        sweep = sweep_given_as_run(path)
        if sweep is not None:
            raise LogReadError(sweep)
        loose = files_named_like_logs(path)
        holds = f"; it holds {_listed(loose)}: give one of them itself" if loose else ""
        raise LogReadError(
            f"{path}: a folder with no training log in it; looked for {STORE_NAME} (also one or two "
            f"levels down), {STATE_NAME} (also in checkpoint-*/), W&B runs ({RUN_FILE_GLOB}), MLflow runs "
            f"(meta.yaml and metrics/), {EVENT_GLOB} and {'/'.join(LOG_NAMES)} step lines{holds}"
        )
    if is_sqlite(path):
        return "mlflow" if is_mlflow_db(path) else "keel_store"
    if is_wandb_file(path):
        return "wandb"
    if is_event_file(path):
        return "tensorboard"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with path.open("rb") as fh:
        start = fh.read(4096)
    if not start.strip():
        raise LogReadError(f"{path}: the file is empty")
    if start.startswith(SQLITE_MAGIC[:6]):
        return "keel_store"
    head, whole = read_head(path)  # raises for binary data; terminal colours left out
    try:
        return _detect_text(path, head)
    except LogReadError:
        if whole:
            raise
    return _detect_text(path, read_console(path))  # a log whose first step line comes after megabytes of banner


def _detect_text(path: Path, text: str) -> str:
    """The reader for a text log from ``text`` (its head, or all of it); `LogReadError` when none fits."""
    stripped = text.lstrip()
    # before JSON: torchrun's "[rank0]:" starts a torchtitan line, a bare "[step=1/100]" an OLMo header, and the
    # Trainer prints "{'loss': ...}" dicts (Python's quotes, not JSON's)
    if looks_like_torchtitan(text):
        return TORCHTITAN
    if looks_like_olmo(text):
        return OLMO
    if looks_like_hf_console(text):
        return HF_CONSOLE
    if stripped.startswith("{"):
        if path.name == STATE_NAME or '"log_history"' in text:
            return "hf_trainer_state"
        return "jsonl"
    first = stripped.partition("\n")[0]
    bracketed = _BRACKETED_TEXT.match(first) is not None  # "[2024-05-01 12:00:00,000] [INFO] ...": a text log
    if stripped.startswith("[") and not bracketed and not _line_formats_in(text):  # "[timestamp] iteration ..."
        return "jsonl"
    if looks_like_step_lines(first):  # before CSV: build-nanogpt may separate its three fields by tabs
        return STEP_LINES
    if looks_like_speedrun(text):  # before CSV: the script's source comes first, and code has commas
        return SPEEDRUN
    if looks_like_megatron(text):  # before CSV: a banner (arguments, commas and all) comes first
        return MEGATRON
    if looks_like_deepspeed(text):  # after Megatron (Megatron-DeepSpeed prints both); before CSV: 'lr=[a, b]'
        return DEEPSPEED
    if looks_like_fairseq(text):  # before CSV: its JSON and 'name=value,' lines have commas
        return FAIRSEQ
    if looks_like_nanogpt(text):  # before CSV: its banner's first line has a comma ("16,384")
        return NANOGPT
    if looks_like_composer(text):  # before CSV: its banner has commas; before JSON: its headers start with '['
        return COMPOSER
    if looks_like_step_fields(text):  # before CSV: a torchtune grad norm prints as "tensor(0.9, device='cuda:0')"
        return STEP_FIELDS
    if looks_like_verl(text):  # before CSV: Hydra's config dump before the step lines has commas
        return VERL
    if looks_like_maxtext(text):  # before CSV: its step lines are ', '-separated
        return MAXTEXT
    if looks_like_tqdm_postfix(text):  # before CSV: a bar's postfix has commas
        return TQDM
    if not bracketed and any(sep in first for sep in (",", "\t", ";")):
        return "csv"
    raise LogReadError(
        f"{path}: unknown log format; allowed: CSV/TSV with a header, JSON lines, {STATE_NAME}, TensorBoard "
        "event files, keel run stores, W&B run files (.wandb), MLflow runs, or the console output of nanoGPT, "
        "build-nanogpt/llm.c, modded-nanogpt, Megatron-LM/nanotron, DeepSpeed's pipeline engine, "
        "fairseq/metaseq, torchtitan, OLMo/OLMo-core, the HF Trainer, torchtune, "
        "NeMo Automodel, Composer, verl, MaxText, or tqdm bars with a name=value postfix (their shapes: README, "
        "'Examine a log you already have')"
    )


# a line that opens with a bracketed tag of words (a timestamp, a level, a rank) and goes on in text: no JSON value
# and no CSV header starts so
_BRACKETED_TEXT = re.compile(r"\[[^\[\]{}\"\n]{1,200}\][ \t]{0,5}[\[\w(]")


def _line_formats_in(text: str) -> bool:
    """Whether ``text`` holds the lines of a format read anywhere in a file: a launcher's or c10d's ``[...]``
    warning first does not make it JSON."""
    line_formats = (
        looks_like_megatron,
        looks_like_deepspeed,
        looks_like_fairseq,
        looks_like_nanogpt,
        looks_like_speedrun,
        looks_like_step_fields,
        looks_like_composer,
        looks_like_verl,
        looks_like_maxtext,
        looks_like_tqdm_postfix,
    )
    return any(looks(text) for looks in line_formats)


def find_logs(path: str | Path, format: str | None = None) -> list[Path]:
    """The logs ``keel doctor PATH`` examines: ``PATH`` itself, or — for a folder with no log of its own that
    holds several keel runs one or two levels down (``runs/A/keel``, ``runs/B/keel``), several W&B runs
    (``wandb/run-*``), several MLflow runs (``mlruns/<experiment>/<run>``), or several TensorBoard runs
    (`tensorboard_runs`) — each of those runs; for an MLflow database of several runs, ``mlflow.db/<run id>`` each.

    A folder holding one run is ``PATH`` itself: `read_log` reads that run and says so in a note.

    Args:
        path: What was given to ``keel doctor``.
        format: The reader forced with ``--format``; a reader other than ``keel_store`` reads ``PATH`` itself.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for run in ("A/keel", "B/keel"):
        ...     (root / run).mkdir(parents=True)
        ...     (root / run / STORE_NAME).touch()
        >>> [str(p.relative_to(root)) for p in find_logs(root)], find_logs(root / "A") == [root / "A"]
        (['A/keel', 'B/keel'], True)
    """
    path = Path(path)
    if format in (None, "mlflow") and path.is_file() and is_mlflow_db(path):
        runs = db_runs(path)
        return runs if len(runs) > 1 else [path]
    if (
        format not in (None, "keel_store", "wandb", "mlflow")
        or not path.is_dir()
        or (path / STORE_NAME).is_file()
        or find_trainer_state(path) is not None
    ):
        return [path]
    runs = find_runs(path) if format in (None, "keel_store") else []
    if len(runs) > 1:
        return runs
    if runs:
        return [path]
    for kind, runs_of in (("wandb", wandb_runs), ("mlflow", mlflow_runs)):
        if format in (None, kind) and (runs := runs_of(path)):
            return runs if len(runs) > 1 else [path]
    if format is None:
        boards = tensorboard_runs(path)
        if len(boards) > 1:
            return boards
    return [path]


# Names a training log is saved under: a file with one of these beside the runs a folder stands for is named as left out
LOG_SUFFIXES = frozenset({".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".log", ".txt", ".out"})
MAX_NAMED = 5


def logs_left_out(folder: str | Path, command: str) -> str | None:
    """A one-line note naming the files directly in ``folder`` that look like training logs (a log's suffix, or a
    TensorBoard event file; hidden files aside) when ``folder`` stands for the runs below it (`find_runs`, several
    TensorBoard runs), so those files are not read; how to read one; None when there are none.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "A" / "keel").mkdir(parents=True)
        >>> (root / "A" / "keel" / STORE_NAME).touch()
        >>> _ = (root / "train.csv").write_text("step,loss\\n1,2.0\\n")
        >>> logs_left_out(root, "keel doctor").startswith(f"{root}: train.csv left out")
        True
    """
    folder = Path(folder)
    if not folder.is_dir() or (folder / STORE_NAME).is_file() or find_trainer_state(folder) is not None:
        return None
    if not find_runs(folder) and len(tensorboard_runs(folder)) < 2:
        return None  # the folder is read as one log, its own files with it
    files = files_named_like_logs(folder)
    if not files:
        return None
    return (
        f"{printable(str(folder))}: {_listed(files)} left out: a folder of runs stands for the runs below it; "
        f"give a log itself to read it ({command} {printable(str(files[0]))})"
    )


def files_named_like_logs(folder: Path) -> list[Path]:
    """The regular, non-hidden files directly in ``folder`` with a log's suffix (`LOG_SUFFIXES`) or a TensorBoard
    event file's name, sorted; none when the folder cannot be listed."""
    try:
        return sorted(f for f in folder.iterdir() if _named_like_a_log(f))
    except OSError:  # no permission, vanished meanwhile
        return []


def _listed(files: list[Path]) -> str:
    """The first `MAX_NAMED` files' names (printable), and how many more."""
    names = ", ".join(printable(f.name) for f in files[:MAX_NAMED])
    return names + (f" and {len(files) - MAX_NAMED} more" if len(files) > MAX_NAMED else "")


def _named_like_a_log(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False
    return regular and (path.suffix.lower() in LOG_SUFFIXES or path.name.startswith(EVENT_GLOB.rstrip("*")))


SPLITS = frozenset({"train", "training", "validation", "val", "eval", "test"})  # Keras' one-folder-per-series


def tensorboard_runs(path: Path) -> list[Path]:
    """The TensorBoard runs under ``path``: each folder of event files is one (``lightning_logs/version_0``, the HF
    Trainer's ``runs/<date_host>``), except that a run's ``train/`` and ``validation/`` folders (Keras) are its
    series. Read as one log, several runs' tags get their folder as a prefix and their steps interleave."""
    roots = {folder.parent if folder.name in SPLITS and folder != path else folder for folder in _event_folders(path)}
    return sorted(roots)


def _event_folders(path: Path) -> set[Path]:
    return {file.parent for file in path.rglob(EVENT_GLOB) if is_event_file(file)}


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "neither a file nor a folder"
