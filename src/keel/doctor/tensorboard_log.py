"""TensorBoard event files (``events.out.tfevents.*``), read without TensorFlow, TensorBoard or protobuf.

Reads the scalars of both summary styles: ``simple_value`` (``torch.utils.tensorboard``'s ``add_scalar``,
TF1) and one-element tensors (TF2 ``tf.summary.scalar``, the ``scalars`` plugin). Images, histograms,
text and audio are skipped. A folder is searched recursively; the event files of one folder are one run
read in file-name order (the names carry their creation time); when the files sit in several folders,
tags are prefixed with the folder (``validation/epoch_loss``), since Keras and ``add_scalars`` write one
subfolder per series. Point it at one run's folder: two runs' folders are read as two sets of series. All
scalars are put in write order by their wall time, so a restarted run shows its repeated steps.

Proto layouts read (tensorflow/core/util/event.proto, framework/summary.proto, framework/tensor.proto):
``Event{1 wall_time: double, 2 step: int64, 5 summary: Summary}``, ``Summary{1 value: repeated Value}``,
``Value{1 tag, 2 simple_value: float, 8 tensor: TensorProto, 9 metadata: SummaryMetadata}``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TypeVar

from keel.doctor._protobuf import (
    FIXED32,
    FIXED64,
    LENGTH,
    VARINT,
    WireError,
    fields,
    packed,
    packed_varints,
    read_varint,
    signed64,
)
from keel.doctor._tfrecord import RecordError, iter_records
from keel.doctor.log import LogReadError, RawLog
from keel.doctor.table import MAX_STEP, Scalars

EVENT_GLOB = "events.out.tfevents.*"
# TensorProto dtypes holding one number, and how to read their raw ``tensor_content``.
_DTYPES = {1: "<f", 2: "<d", 3: "<i", 9: "<q", 19: "<e", 14: "bf16"}
_T = TypeVar("_T")  # a field's value: an int (varint) or bytes
_SKIP_PLUGINS = {"images", "histograms", "text", "audio", "pr_curves", "graph", "hparams", "custom_scalars"}


def is_event_file(path: Path) -> bool:
    return path.is_file() and "tfevents" in path.name


def read_tensorboard_log(path: str | Path) -> RawLog:
    """Read an event file, or every event file under a folder.

    Raises:
        LogReadError: No event file, a file that is not TFRecord-framed, or no scalar in any of them.
    """
    path = Path(path)
    files = sorted(path.rglob(EVENT_GLOB)) if path.is_dir() else [path]
    files = [f for f in files if f.is_file()]  # not a FIFO or a device someone named like an event file
    if not files:
        raise LogReadError(f"{path}: no TensorBoard event file ({EVENT_GLOB}) in this folder")
    # Tags are prefixed with the folder below the files' common folder: nothing for one folder, "train/"
    # and "validation/" for Keras' two.
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    scalars = Scalars()
    for rank, file in enumerate(files):
        prefix = "/".join(file.parent.relative_to(root).parts)
        data = file.read_bytes()
        if not data:
            continue
        try:
            for order, payload in enumerate(iter_records(data)):
                try:
                    event = _scalars(payload)
                except (WireError, struct.error):
                    scalars.malformed += 1  # framed correctly, but not an Event: one event lost, not the file
                    continue
                if event is None:
                    continue
                wall, step, values, other = event
                scalars.skipped += other
                if not -MAX_STEP < step < MAX_STEP:
                    scalars.malformed += 1
                    continue
                for tag, value in values:
                    scalars.add(wall, rank, order, step, f"{prefix}/{tag}" if prefix else tag, value)
        except RecordError as exc:
            raise LogReadError(f"{file}: not a TensorBoard event file ({exc})") from None
    if not len(scalars.steps):
        raise LogReadError(f"{path}: the event file(s) hold no scalar values")
    log = RawLog(source=str(path), format="tensorboard", step_column="event step")
    log.records = scalars.records()
    if scalars.skipped:
        log.notes.append(f"{scalars.skipped} non-scalar summaries (images, histograms, text …) were skipped")
    if scalars.malformed:
        log.notes.append(f"{scalars.malformed} malformed event(s) were skipped")
    if len(files) > 1:
        log.notes.append(f"read {len(files)} event files")
    return log


_Event = tuple[float, int, list[tuple[str, float]], int]


def _scalars(payload: bytes) -> _Event | None:
    """(wall time, step, [(tag, value)], non-scalar count) of one Event; None when it has no summary."""
    return _add_scalar_event(payload) or _scalars_fields(payload)


def _add_scalar_event(b: bytes) -> _Event | None:
    """`_scalars` of the event ``add_scalar`` writes — ``wall_time``, ``step``, then a summary of one value holding a
    tag (under 128 bytes) and a ``simple_value``, nothing else — read at fixed offsets: a long run's millions of
    events cost 3x less than through the generic field walk. None for any other event (`_scalars_fields` reads it)."""
    size = len(b)
    if size < 16 or b[0] != 0x09 or b[9] != 0x10:  # field 1 fixed64, field 2 varint
        return None
    step, pos = read_varint(b, 10)
    if pos + 4 > size or b[pos] != 0x2A or b[pos + 2] != 0x0A:  # field 5 (summary), its field 1 (value)
        return None
    summary_size, value_size, tag_size = b[pos + 1], b[pos + 3], b[pos + 5] if pos + 5 < size else 0x80
    tag_end = pos + 6 + tag_size
    if (
        summary_size != value_size + 2
        or pos + 2 + summary_size != size
        or value_size != tag_size + 7
        or tag_size & 0x80
        or b[pos + 4] != 0x0A  # the value's field 1 (tag)
        or b[tag_end] != 0x15  # its field 2 (simple_value), fixed32, the last 4 bytes
    ):
        return None
    (wall,) = struct.unpack_from("<d", b, 1)
    (value,) = struct.unpack_from("<f", b, tag_end + 1)
    return wall, signed64(step), [(b[pos + 6 : tag_end].decode("utf-8", "replace"), value)], 0


def _scalars_fields(payload: bytes) -> _Event | None:
    wall, step, summary = 0.0, 0, None
    for number, wire, varint, data in fields(payload):
        if number == 1 and wire == FIXED64:
            (wall,) = struct.unpack("<d", data)
        elif number == 2 and wire == VARINT:
            step = signed64(varint)
        elif number == 5 and wire == LENGTH:
            summary = data
    if summary is None:
        return None
    found, other = [], 0
    for number, wire, _, data in fields(summary):
        if number == 1 and wire == LENGTH:
            scalar = _value(data)
            if scalar is None:
                other += 1
            else:
                found.append(scalar)
    return wall, step, found, other


def _value(buf: bytes) -> tuple[str, float] | None:
    tag, simple, tensor, plugin = "", None, None, ""
    for number, wire, _, data in fields(buf):
        if number == 1 and wire == LENGTH:
            tag = data.decode("utf-8", "replace")
        elif number == 2 and wire == FIXED32:
            (simple,) = struct.unpack("<f", data)
        elif number == 8 and wire == LENGTH:
            tensor = data
        elif number == 9 and wire == LENGTH:
            plugin = _plugin_name(data)
    if simple is not None:
        return tag, float(simple)
    if tensor is None or plugin in _SKIP_PLUGINS:
        return None
    number_value = _tensor_scalar(tensor)
    return None if number_value is None else (tag, number_value)


def _plugin_name(metadata: bytes) -> str:
    for number, wire, _, data in fields(metadata):
        if number == 1 and wire == LENGTH:  # plugin_data
            for n2, w2, _, d2 in fields(data):
                if n2 == 1 and w2 == LENGTH:
                    return d2.decode("utf-8", "replace")
    return ""


def _tensor_scalar(buf: bytes) -> float | None:
    """The value of a one-element numeric TensorProto; None for anything else."""
    dtype, dims, content = 0, [], b""
    values: list[float] = []
    for number, wire, varint, data in fields(buf):
        if number == 1 and wire == VARINT:
            dtype = varint
        elif number == 2 and wire == LENGTH:
            for n2, w2, _, d2 in fields(data):
                if n2 == 2 and w2 == LENGTH:  # dim
                    sizes = (signed64(v3) for n3, w3, v3, _ in fields(d2) if n3 == 1 and w3 == VARINT)
                    dims.append(next(sizes, 0))
        elif number == 4 and wire == LENGTH:
            content = data
        elif number == 5:  # float_val: packed or not
            values += packed(data, "<f") if wire == LENGTH else [struct.unpack("<f", _wire(data, wire, FIXED32))[0]]
        elif number == 6:  # double_val
            values += packed(data, "<d") if wire == LENGTH else [struct.unpack("<d", _wire(data, wire, FIXED64))[0]]
        elif number in (7, 10):  # int_val, int64_val
            values += packed_varints(data) if wire == LENGTH else [signed64(_wire(varint, wire, VARINT))]
    if dtype not in _DTYPES or any(d != 1 for d in dims):
        return None
    if content:
        fmt = _DTYPES[dtype]
        if fmt == "bf16":
            return struct.unpack("<f", b"\x00\x00" + content[:2])[0] if len(content) == 2 else None
        return struct.unpack(fmt, content)[0] if len(content) == struct.calcsize(fmt) else None
    return float(values[0]) if len(values) == 1 else None


def _wire(value: _T, wire: int, expected: int) -> _T:
    """``value`` when its wire type is the one its field must have; `WireError` otherwise (a hand-made or
    corrupt event: a float sent as a varint)."""
    if wire != expected:
        raise WireError(f"a tensor value of wire type {wire} where {expected} belongs")
    return value
