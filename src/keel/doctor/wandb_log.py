"""Weights & Biases runs: the transaction log ``run-<id>.wandb`` a run writes beside it (online, offline or synced),
read without wandb or protobuf.

Layout (wandb-core 0.31's writer; the same as the Python ``datastore.py`` of earlier releases): a 7-byte file header
``":W&B" | uint16 0xBEE1 | uint8 version``, then LevelDB-log framing in 32 KiB blocks counted from the start of the
file: each chunk is ``uint32 crc | uint16 length | uint8 type | data``, little-endian, with ``crc`` the zlib CRC-32
of the type byte followed by the data; type 1 is a whole record, 2/3/4 the first, middle and last pieces of one that
spans blocks, and a block's last 6 bytes or fewer are zero padding. Each record is a protobuf ``Record``
(wandb/proto/wandb_internal.proto): ``Record{2 history: HistoryRecord, 17 run: RunRecord, 18 exit: RunExitRecord}``,
``HistoryRecord{1 item: repeated HistoryItem, 2 step: HistoryStep{1 num: int64}}``, ``HistoryItem{1 key,
2 nested_key: repeated string, 5 integer: sint64, 6 number: double, 16 value_json}``. Values are JSON:
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` as ``json`` reads them; a dict (an image, a histogram) is skipped.

Steps: W&B's own counter ``_step`` unless the run logs a step of its own (the HF Trainer's ``train/global_step``,
one of `keel.doctor.columns.STEP_COLUMNS`): that one is the optimizer step, ``_step`` then just counts ``log`` calls.
W&B's bookkeeping (``_runtime``, ``_timestamp``, ``_step``; a histogram's ``weights._type``) is not a column.

A run killed while writing ends in a cut record or zeroed bytes: read up to there, with a note. A chunk whose
checksum fails is skipped with the rest of its block (the next block starts a fresh chunk), as LevelDB's own
reader does, and counted in a note; a file whose first chunk fails is not a W&B run file.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.doctor._folders import runs_below, several_runs_error
from keel.doctor._protobuf import FIXED64, LENGTH, VARINT, WireError, fields, signed64
from keel.doctor.columns import find_step_column
from keel.doctor.log import LogReadError, RawLog, parse_number, parse_step
from keel.doctor.table import TableBuilder

MAGIC = b":W&B"
HEADER = struct.Struct("<4sHB")  # ident, magic 0xBEE1, version
BLOCK = 32768
CHUNK = struct.Struct("<IHB")  # crc, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
RUN_FILE_GLOB = "*.wandb"
HISTORY, RUN, EXIT = 2, 17, 18
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}
_OWN_STEP = "_step"
_RUN_FOLDER = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")  # run-<start>-<id>, offline-run-<start>-<id>
_ITEM_TAG, _STEP_TAG = 0x0A, 0x12  # HistoryRecord fields 1 (item) and 2 (step), length-delimited
_NESTED_KEY_TAG, _VALUE_JSON_TAG = 0x12, b"\x82\x01"  # HistoryItem fields 2 and 16, length-delimited


def is_wandb_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a W&B transaction log."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def run_file(folder: Path) -> Path | None:
    """The ``*.wandb`` file directly in ``folder`` (a run folder); None when there is none."""
    try:
        return next((f for f in sorted(folder.glob(RUN_FILE_GLOB)) if f.is_file()), None)
    except OSError:
        return None


def wandb_runs(folder: Path) -> list[Path]:
    """The W&B run folders ``folder`` stands for: itself (``wandb/run-20250101_120000-abc123``), those of a ``wandb``
    folder, or of a project folder holding ``wandb/``; ``wandb/latest-run`` (a link) is not a second run, nor is a
    resumed run's later folder (the same run id, `run_segments`): a run is named by its first folder."""
    first: dict[tuple[Path, str], Path] = {}
    for run in sorted(runs_below(folder, lambda p: run_file(p) is not None, depth=2), key=_started):
        first.setdefault((run.parent, _run_id(run)), run)
    return sorted(first.values())


def run_segments(folder: Path) -> list[Path]:
    """The folders of the run in ``folder``, in the order they were started: a run resumed (``wandb.init(id=...,
    resume=...)``) writes a new ``run-<date>_<time>-<id>`` folder beside the first, holding only its own steps."""
    if _RUN_FOLDER.fullmatch(folder.name) is None:
        return [folder]
    run_id = _run_id(folder)
    try:
        beside = [p for p in folder.parent.iterdir() if _RUN_FOLDER.fullmatch(p.name) and _run_id(p) == run_id]
    except OSError:
        return [folder]
    return sorted((p for p in beside if not p.is_symlink() and run_file(p) is not None), key=_started)


def _run_id(folder: Path) -> str:
    match = _RUN_FOLDER.fullmatch(folder.name)
    return match.group(2) if match else folder.name


def _started(folder: Path) -> str:
    """The start time a run folder's name holds (``20250101_120000``), to order an offline and an online folder."""
    match = _RUN_FOLDER.fullmatch(folder.name)
    return match.group(1) if match else folder.name


@dataclass
class _Framing:
    """What the framing of a run file left out."""

    corrupt: int = 0  # chunks whose checksum failed (the rest of their block skipped)
    orphans: int = 0  # pieces of a record whose first piece was lost
    cut_at: int | None = None  # where a cut-off chunk starts (a run killed mid-write)


def iter_records(data: bytes, framing: _Framing) -> Iterator[bytes]:
    """The records of a run file's bytes (its header checked by the caller), in order.

    A chunk cut off at the end ends the iteration (``framing.cut_at``); a zero chunk header skips to the next
    block (padding, or space written ahead); a failed checksum skips the rest of the block (``framing.corrupt``).
    """
    pos, end = HEADER.size, len(data)
    pieces: list[bytes] | None = None
    while pos < end:
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # the block's tail is padding
            pos += left
            continue
        if pos + CHUNK.size > end:
            framing.cut_at = pos if any(data[pos:end]) else None
            return
        crc, length, kind = CHUNK.unpack_from(data, pos)
        start = pos + CHUNK.size
        if kind == 0 and length == 0 and crc == 0:
            pos += left  # zeros: nothing more in this block
            continue
        if start + length > end:
            framing.cut_at = pos
            return
        chunk = data[start : start + length]
        if kind not in _TYPE_CRC or length > left - CHUNK.size or zlib.crc32(chunk, _TYPE_CRC[kind]) != crc:
            if pos == HEADER.size:
                raise LogReadError(f"bad checksum in its first record (byte {pos}): not a W&B run file, or corrupt")
            framing.corrupt += 1
            pieces = None
            pos += left
            continue
        pos = start + length
        if kind == FULL:
            framing.orphans += pieces is not None
            pieces = None
            yield chunk
        elif kind == FIRST:
            framing.orphans += pieces is not None
            pieces = [chunk]
        elif pieces is None:
            framing.orphans += 1
        elif kind == MIDDLE:
            pieces.append(chunk)
        else:
            yield b"".join((*pieces, chunk))
            pieces = None


@dataclass
class _History:
    """The history rows of a run, column by column, and what was left out."""

    table: TableBuilder
    step_column: str
    text_columns: set[str]
    media: int = 0  # values that are images, histograms, tables (JSON objects)
    no_step: int = 0


def read_wandb_log(path: str | Path) -> RawLog:
    """Read a W&B run: its ``run-<id>.wandb`` file, its run folder, or a ``wandb`` folder holding one run. A run
    folder is read with the later folders of the same run id beside it (a resumed run, `run_segments`), one after
    the other: the steps a resume goes over again are a restart, as in any log.

    Raises:
        LogReadError: No run file, a folder of several runs (`keel.doctor.find_logs` lists them), a file that is
            not a W&B transaction log, or a run with no history row.
    """
    path = Path(path)
    files, notes = _locate(path)
    rows: list[tuple[int | None, dict[str, Any]]] = []
    meta: dict[str, Any] = {}
    for file in files:
        meta.pop("exit_code", None)  # the last file's exit record says how the run ended
        notes += _read_file(file, rows, meta)
    if not rows:
        raise LogReadError(f"{files[-1]}: the run logged no history (no wandb.log call reached the file)")
    history = _history(rows)
    if not len(history.table):
        raise LogReadError(f"{files[-1]}: no history row has a step ({history.step_column})")
    log = RawLog(source=str(path), format="wandb", step_column=history.step_column, notes=notes)
    log.records = history.table.build()
    log.text_columns = sorted(history.text_columns - set(log.records.columns))
    log.meta.update(meta)
    log.notes += _notes(history, meta)
    return log


def _read_file(file: Path, rows: list[tuple[int | None, dict[str, Any]]], meta: dict[str, Any]) -> list[str]:
    """Add one run file's history rows to ``rows`` and its run facts to ``meta``; notes on what it left out."""
    data = file.read_bytes()
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise LogReadError(f"{file}: not a W&B run file (it starts with {data[:7]!r}, not {MAGIC!r})")
    framing = _Framing()
    malformed = 0
    try:
        for record in iter_records(data, framing):
            try:
                malformed += _read_record(record, rows, meta)
            except (WireError, UnicodeDecodeError, struct.error):
                malformed += 1
    except LogReadError as exc:
        raise LogReadError(f"{file}: {exc}") from None
    return _framing_notes(file, framing, malformed)


def _locate(path: Path) -> tuple[list[Path], list[str]]:
    """The run files to read for ``path``, and notes when a folder stood for the one run below it or the run was
    resumed in later folders."""
    if not path.is_dir():
        return [path], []
    runs = wandb_runs(path)
    if not runs:
        summary = (
            " (files/wandb-summary.json holds only the last values, not the history)"
            if (path / "files" / "wandb-summary.json").is_file()
            else ""
        )
        raise LogReadError(f"{path}: no W&B run file ({RUN_FILE_GLOB}) here or in its run folders{summary}")
    if len(runs) > 1:
        raise LogReadError(several_runs_error(path, runs, "W&B"))
    notes = [] if runs[0] == path else [f"{path} holds one W&B run, {runs[0].name}: examined that"]
    segments = run_segments(runs[0])
    if len(segments) > 1:
        names = ", ".join(p.name for p in segments)
        notes.append(f"run {_run_id(runs[0])} was resumed: its {len(segments)} folders read in turn ({names})")
    return [file for folder in segments if (file := run_file(folder)) is not None], notes


def _read_record(record: bytes, rows: list[tuple[int | None, dict[str, Any]]], meta: dict[str, Any]) -> int:
    """Add a history record's row to ``rows``, a run or exit record's facts to ``meta``; 1 for a history record
    that is not one (a wrong wire type), else 0."""
    for number, wire, _, data in fields(record):
        if number == HISTORY:
            if wire != LENGTH:
                return 1
            rows.append(_history_row(data))
        elif number == RUN and wire == LENGTH:
            meta.update(_run_facts(data))
        elif number == EXIT and wire == LENGTH:
            meta["exit_code"] = next((signed64(v) for n, w, v, _ in fields(data) if n == 1 and w == VARINT), 0)
    return 0


def _history_row(buf: bytes) -> tuple[int | None, dict[str, Any]]:
    """(W&B's step, {key: value}) of one HistoryRecord; values as their JSON holds them.

    wandb writes each item and the step as a length-delimited field shorter than 128 bytes: those are walked here
    byte by byte (a generic protobuf walk costs most of a large run's read); a row with anything else (a histogram,
    a long key, a field another writer adds) is read by `_history_row_fields`.
    """
    step, row = None, {}
    pos, end = 0, len(buf)
    while pos < end:
        tag = buf[pos]
        if tag not in (_ITEM_TAG, _STEP_TAG) or pos + 1 >= end or buf[pos + 1] & 0x80:
            return _history_row_fields(buf)
        start = pos + 2
        pos = start + buf[pos + 1]
        if pos > end:
            raise WireError("field runs past the end of the message")
        if tag == _ITEM_TAG:
            key, value = _item(buf[start:pos])
            row[key] = value
        else:
            step = _step_num(buf[start:pos])
    return step, row


def _history_row_fields(buf: bytes) -> tuple[int | None, dict[str, Any]]:
    step, row = None, {}
    for number, wire, _, data in fields(buf):
        if number == 1 and wire == LENGTH:
            key, value = _item(data)
            row[key] = value
        elif number == 2 and wire == LENGTH:
            step = _step_num(data)
    return step, row


def _step_num(buf: bytes) -> int:
    return next((signed64(v) for n, w, v, _ in fields(buf) if n == 1 and w == VARINT), 0)


def _item(buf: bytes) -> tuple[str, Any]:
    """(key, value) of a HistoryItem: wandb 0.31's ``nested_key`` (one, short) then ``value_json`` (short) directly,
    anything else through `_item_fields`."""
    size = len(buf)
    if size > 2 and buf[0] == _NESTED_KEY_TAG and buf[1] < 0x80:
        key_end = 2 + buf[1]
        if (
            buf[key_end : key_end + 2] == _VALUE_JSON_TAG
            and key_end + 2 < size
            and key_end + 3 + buf[key_end + 2] == size
        ):
            return buf[2:key_end].decode(), _json(buf[key_end + 3 :])
    return _item_fields(buf)


def _item_fields(buf: bytes) -> tuple[str, Any]:
    key, nested, value = "", [], None
    for number, wire, varint, data in fields(buf):
        if number == 1 and wire == LENGTH:
            key = data.decode()
        elif number == 2 and wire == LENGTH:
            nested.append(data.decode())
        elif number == 16 and wire == LENGTH:
            value = _json(data)
        elif number == 6 and wire == FIXED64:
            (value,) = struct.unpack("<d", data)
        elif number == 5 and wire == VARINT:
            value = (varint >> 1) ^ -(varint & 1)  # sint64
    return key or ".".join(nested), value


def _json(data: bytes) -> Any:
    try:
        number = float(data)  # most values are numbers ("NaN" and "Infinity" too): float is 5x faster than json
        if not (number.is_integer() and abs(number) >= 2**53):  # a large integer (a step) keeps every digit
            return number
    except ValueError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8, or nested past Python's limit): text, left out
        return data.decode("utf-8", "replace")


def _run_facts(buf: bytes) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for number, wire, varint, data in fields(buf):
        if number == 1 and wire == LENGTH:
            facts["run_id"] = data.decode("utf-8", "replace")
        elif number == 14 and wire == VARINT and varint:
            facts["starting_step"] = signed64(varint)
        elif number == 18 and wire == VARINT and varint:
            facts["resumed"] = True
    return facts


def _history(rows: list[tuple[int | None, dict[str, Any]]]) -> _History:
    """The rows as a table: stepped by the run's own step column when it logs one, else by ``_step``."""
    names = dict.fromkeys(name for _, row in rows for name in row if not name.startswith("_"))
    own = find_step_column(names)
    history = _History(TableBuilder(), own or _OWN_STEP, set())
    for wandb_step, row in rows:
        step = parse_step(row.get(own)) if own else parse_step(row.get(_OWN_STEP, wandb_step))
        if step is None:
            history.no_step += 1
            continue
        history.table.add(step, _numbers(row, own, history))  # the Trainer's eval row repeats a step: merged later
    return history


def _numbers(row: dict[str, Any], own: str | None, history: _History) -> dict[str, float]:
    """The numbers of a history row, W&B's bookkeeping and the step aside; text and media counted in ``history``."""
    values: dict[str, float] = {}
    for name, raw in row.items():
        if name.startswith("_") or "._" in name or name == own or raw is None:  # "weights._type" of a histogram
            continue
        number = raw if type(raw) is float else parse_number(raw)  # most are floats already (`_json`)
        if number is not None:
            values[name] = number
        elif isinstance(raw, (dict, list)):
            history.media += 1
        else:
            history.text_columns.add(name)
    return values


def _framing_notes(file: Path, framing: _Framing, malformed: int) -> list[str]:
    notes = []
    if framing.cut_at is not None:
        notes.append(
            f"{file.name} ends in a cut-off record at byte {framing.cut_at} (a run killed while writing): "
            "read up to there"
        )
    if framing.corrupt or framing.orphans:
        notes.append(
            f"{file.name}: {framing.corrupt} chunk(s) with a bad checksum skipped with the rest of their block, "
            f"{framing.orphans} piece(s) of records cut by them"
        )
    if malformed:
        notes.append(f"{file.name}: {malformed} malformed record(s) skipped")
    return notes


def _notes(history: _History, meta: dict[str, Any]) -> list[str]:
    notes = []
    if history.no_step:
        notes.append(f"{history.no_step} history row(s) without an integer {history.step_column} skipped")
    if history.media:
        notes.append(f"{history.media} value(s) that are lists or objects (media, histograms, tables) skipped")
    if "exit_code" not in meta:
        notes.append("the run has no exit record: it was killed or is still running")
    if meta.get("resumed"):
        notes.append(f"a resumed run (from step {meta.get('starting_step', 0)}): this file holds only its steps since")
    return notes
