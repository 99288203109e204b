"""Hugging Face ``trainer_state.json``: the Trainer's ``log_history``, one entry per logging or eval step.

Train and eval entries of the same step are merged. The closing summary entry (``train_runtime``,
``train_loss`` = the mean loss of the whole run) is left out: read as a loss it would be a fake last point.
A checkpoint folder, or an output folder holding ``checkpoint-*/``, is read from its newest state.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from keel.doctor._text import read_text
from keel.doctor.jsonl_log import RepeatedKeys, load_json, records_from_objects
from keel.doctor.log import LogReadError, RawLog

STATE_NAME = "trainer_state.json"
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "total_flos")


def find_trainer_state(folder: Path) -> Path | None:
    """``folder/trainer_state.json``, else the one in the highest-numbered ``checkpoint-N``; None if none."""
    if (folder / STATE_NAME).is_file():
        return folder / STATE_NAME
    checkpoints = [
        (int(m.group(1)), p)
        for p in folder.glob(f"checkpoint-*/{STATE_NAME}")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))
    ]
    return max(checkpoints)[1] if checkpoints else None


def read_trainer_state(path: str | Path) -> RawLog:
    """Read a Trainer state file (or a folder holding one).

    Raises:
        LogReadError: Not JSON, no ``log_history`` list, or no entry with a step.
    """
    path = Path(path)
    if path.is_dir():
        found = find_trainer_state(path)
        if found is None:
            raise LogReadError(f"{path}: no {STATE_NAME} in this folder or its checkpoint-* folders")
        path = found
    repeats = RepeatedKeys()
    try:
        state = load_json(read_text(path), repeats)
    except ValueError as exc:
        msg = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise LogReadError(f"{path}: not valid JSON ({msg})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise LogReadError(f"{path}: no 'log_history' list, so not a Hugging Face trainer_state.json")
    if not history:
        raise LogReadError(f"{path}: 'log_history' is empty (nothing was logged yet)")
    entries = [e for e in history if not (isinstance(e, dict) and any(k in e for k in SUMMARY_KEYS))]
    log = records_from_objects(path, entries, fmt="hf_trainer_state", repeats=repeats)
    if len(entries) < len(history):
        log.notes.append(
            f"{len(history) - len(entries)} end-of-training summary entr(ies) left out "
            "(their train_loss is the mean of the whole run)"
        )
    for key in ("global_step", "max_steps", "logging_steps", "eval_steps", "num_train_epochs"):
        if isinstance(state.get(key), (int, float)) and not isinstance(state[key], bool):
            log.meta[key] = state[key]
    return log
