"""Writes the TensorBoard fixtures in this folder with the `tensorboard` package's own writer, not keel's.

Run once, with tensorboard installed (``pip install tensorboard``): ``python make_tensorboard_fixtures.py``.
The tests read the committed files, so they need neither tensorboard nor protobuf.

- ``tb_simple/``: ``simple_value`` scalars (what ``torch.utils.tensorboard.SummaryWriter.add_scalar`` writes),
  tags ``train/loss``, ``train/grad_norm``, ``train/learning_rate`` at steps 0..59; a NaN loss at step 50;
  one histogram summary at step 0 (must be skipped).
- ``tb_tensor/``: TF2-style scalars (one-element float32 tensors with ``scalars`` plugin metadata) for
  ``epoch_loss`` in ``train/`` and ``validation/`` subfolders, steps 0..29.
"""

import math
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter

HERE = Path(__file__).parent


def loss_at(step: int) -> float:
    return 3.0 + 0.01 * (step % 3)


def simple() -> None:
    w = EventFileWriter(str(HERE / "tb_simple"), filename_suffix=".fixture")
    w.add_event(
        Event(
            wall_time=1000.0,
            step=0,
            summary=Summary(
                value=[Summary.Value(tag="weights", histo=HistogramProto(min=0, max=1, num=2, sum=1, sum_squares=1))]
            ),
        )
    )
    for step in range(60):
        loss = math.nan if step == 50 else loss_at(step)
        for i, (tag, value) in enumerate(
            (("train/loss", loss), ("train/grad_norm", 1.0 + 0.05 * (step % 2)), ("train/learning_rate", 1e-3))
        ):
            w.add_event(
                Event(
                    wall_time=1000.0 + step + i * 1e-3,
                    step=step,
                    summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]),
                )
            )
    w.close()


def tensor() -> None:
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
    for sub, offset in (("train", 0.0), ("validation", 0.5)):
        w = EventFileWriter(str(HERE / "tb_tensor" / sub), filename_suffix=".fixture")
        for step in range(30):
            t = TensorProto(dtype=1, tensor_shape=TensorShapeProto(), float_val=[loss_at(step) + offset])
            w.add_event(
                Event(
                    wall_time=2000.0 + step + (0.5 if offset else 0.0),
                    step=step,
                    summary=Summary(value=[Summary.Value(tag="epoch_loss", tensor=t, metadata=meta)]),
                )
            )
        w.close()


if __name__ == "__main__":
    simple()
    tensor()
