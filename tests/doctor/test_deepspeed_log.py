"""DeepSpeed's own console: the pipeline engine's ``steps: N loss: X iter time (s): T samples/sec: S`` lines.

Outside-in: the print format is DeepSpeed's (``deepspeed/runtime/pipe/engine.py``, ``PipelineEngine.train_batch``);
the engine's ``[Rank 0] step=N, skipped=K, lr=[...]`` and loss-scaler ``Overflow detected`` lines around it are
copied from a public Megatron-DeepSpeed log. Before, such a log was "unknown log format".
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.doctor import detect_format, examine_log, read_log
from keel.doctor.log import LogReadError

ENGINE = (
    "[2023-08-15 07:22:30,556] [INFO] [logging.py:96:log_dist] [Rank 0] step={s}, skipped=0, "
    "lr=[0.0001371, 0.0001371], mom=[(0.9, 0.95), (0.9, 0.95)]\n"
)
OVERFLOW = (
    "[2023-08-15 07:22:30,556] [INFO] [logging.py:96:log_dist] [Rank 0] Overflow detected. Skipping step. "
    "Attempted loss scale: 65536, reducing to 32768.0\n"
)
STEPS = "steps: {s} loss: {loss:0.4f} iter time (s): 1.202 samples/sec: 26.614\n"


def _log(path, spike_at=None, n=300):
    lines = ["[2023-08-15 07:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 0] DeepSpeed info: version=0.10.0\n"]
    for s in range(1, n + 1):
        if s == 150:
            lines.append(OVERFLOW)
        lines.append(ENGINE.format(s=s))
        loss = 3.0 - s / 1000 + (0.003 * (s % 7))
        lines.append(STEPS.format(s=s, loss=loss * (4 if s == spike_at else 1)))
    path.write_text("".join(lines))


def test_deepspeeds_pipeline_engine_lines_are_read(tmp_path):
    path = tmp_path / "train.log"
    _log(path)
    assert detect_format(path) == "deepspeed"  # was: unknown log format
    log = read_log(path)
    assert len(log.records) == 300
    assert log.records[0] == (1, {"loss": 3.002, "iter_time_s": 1.202, "samples_sec": 26.614})
    assert any("301 lines that are not step lines" in note for note in log.notes)  # the banner, the engine
    assert any(note.startswith("1 loss-scaler overflow") for note in log.notes)  # the scaler's, on their own


def test_a_loss_spike_in_deepspeeds_log_is_found(tmp_path):
    path = tmp_path / "train.log"
    _log(path, spike_at=250)
    assert any(f.step == 250 and "spike" in f.kind for f in examine_log(path).findings)


def test_newer_and_forked_shapes_are_read(tmp_path):
    # newer DeepSpeed: additional losses before "iter time"; forks: "step: N / TOTAL" and an eta (text, left out)
    path = tmp_path / "train.log"
    path.write_text(
        "steps: 10 loss: 2.5000 moe_loss: 0.0100 iter time (s): 1.000 samples/sec: 8.000\n"
        "[^^] step:    20 /   100 loss: 2.4000 iter time (s): 1.000 samples/sec: 8.000 eta: 0:01:20 \n"
    )
    log = read_log(path)
    assert [step for step, _ in log.records] == [10, 20]
    assert log.records[0][1]["moe_loss"] == 0.01 and log.records[1][1]["loss"] == 2.4
    assert "eta" in log.text_columns


def test_a_megatron_deepspeed_log_stays_megatron(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(
        STEPS.format(s=1, loss=3.0)
        + " iteration        1/    2500 | consumed samples:           32 | lm loss: 3.000000E+00 | grad norm: 2.265 |\n"
    )
    assert detect_format(path) == "megatron"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_after_a_step_line_are_read_or_one_clear_error(tmp_path_factory, tail):
    path = tmp_path_factory.mktemp("ds") / "train.log"
    path.write_bytes(STEPS.format(s=1, loss=2.0).encode() + tail)
    try:
        log = read_log(path, format="deepspeed")
    except LogReadError:
        return
    assert log.records[0][0] == 1


def test_no_step_line_is_one_clear_error(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(ENGINE.format(s=1))
    with pytest.raises(LogReadError, match="steps: N loss: X"):
        read_log(path, format="deepspeed")
