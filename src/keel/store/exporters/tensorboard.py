"""TensorBoard export: every signal as a scalar (its key is the tag), findings and decisions as text at their
step, the run's metadata as text at step 0. Needs ``tensorboard`` (``pip install 'keel[tensorboard]'``), not
TensorFlow and not torch: events are written with TensorBoard's own protobufs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from keel.store.exporters._table import RunTable

FINDINGS_TAG, DECISIONS_TAG, META_TAG = "keel/findings", "keel/decisions", "keel/meta"
# One name for every export (TensorBoard reads any file named *tfevents*): an export into a folder that holds an
# earlier one replaces it. Named by time, host and process id, a second export was a second file beside the first,
# and TensorBoard and `keel doctor` read the run twice (every step and finding doubled, a "restart" at step 0).
EVENT_FILE = "events.out.tfevents.keel"


def export(table: RunTable, out: Path) -> list[Path]:
    """Write one event file into ``out`` (created); returns its path.

    Written in this thread, record by record (TensorBoard's framing, `RecordWriter`): TensorBoard's own
    `EventFileWriter` writes from a thread of its own, whose failure (a full disk) printed a traceback besides the
    error raised here.
    """
    try:
        from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as exc:
        raise ImportError(
            "keel export --format tensorboard needs tensorboard: pip install 'keel[tensorboard]'"
        ) from exc
    out.mkdir(parents=True, exist_ok=True)
    wall = time.time()
    path = out / EVENT_FILE
    with path.open("wb") as handle:
        writer = RecordWriter(handle)

        def add(event: Event) -> None:
            writer.write(event.SerializeToString())

        add(Event(wall_time=wall, file_version="brain.Event:2", source_metadata=SourceMetadata(writer="keel")))
        add(
            Event(
                wall_time=wall,
                step=0,
                summary=Summary(value=[_text(META_TAG, json.dumps(table.meta, indent=1, default=str))]),
            )
        )
        for step, values in table.rows:
            add(
                Event(
                    wall_time=wall,
                    step=step,
                    summary=Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]),
                )
            )
        for tag, records in ((FINDINGS_TAG, table.finding_records()), (DECISIONS_TAG, table.decision_records())):
            for step in sorted({r["step"] for r in records}):
                text = json.dumps([r for r in records if r["step"] == step], indent=1)
                add(Event(wall_time=wall, step=step, summary=Summary(value=[_text(tag, text)])))
    return [path]


def _text(tag: str, text: str):  # type: ignore[no-untyped-def]
    """A text summary value (TensorBoard's text plugin: a string tensor with plugin metadata)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    tensor = TensorProto(dtype=DT_STRING, string_val=[text.encode()], tensor_shape=TensorShapeProto(dim=[]))
    return Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
