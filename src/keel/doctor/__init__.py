"""Examine a training log you already have: CSV, JSONL, TensorBoard, Hugging Face ``trainer_state.json``, a W&B or
MLflow run, a keel run store or a framework's console output, read into `Observation`s and run through the same
detectors a `Guard` uses live.

    from keel.doctor import examine_log
    result = examine_log("runs/exp1/trainer_state.json")
    for f in result.at_least("warning"):
        print(f.step, f.kind, f.cause, f.advice)
"""

from keel.doctor.columns import ALIASES, STEP_COLUMNS, map_columns
from keel.doctor.examine import examine, examine_log, logging_stride, scale_for_stride
from keel.doctor.formats import FORMATS, detect_format, find_logs, read_log
from keel.doctor.log import LogReadError, RawLog
from keel.doctor.result import DoctorResult
from keel.doctor.table import Column, LogTable
from keel.doctor.text import format_result
from keel.doctor.timeline import Timeline, build_timeline

__all__ = [
    "ALIASES",
    "Column",
    "DoctorResult",
    "FORMATS",
    "LogReadError",
    "LogTable",
    "RawLog",
    "STEP_COLUMNS",
    "Timeline",
    "build_timeline",
    "detect_format",
    "examine",
    "examine_log",
    "find_logs",
    "format_result",
    "logging_stride",
    "map_columns",
    "read_log",
    "scale_for_stride",
]
