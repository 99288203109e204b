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
    # the engine's report of the same step joins it (was: counted as a line left out)
    lr = 0.0001371
    assert log.records[0] == (
        1,
        {"skipped_steps": 0.0, "lr": lr, "lr/1": lr, "loss": 3.002, "iter_time_s": 1.202, "samples_sec": 26.614},
    )
    assert any(note == "1 lines that are not step lines left out" for note in log.notes)  # the banner
    assert any(note.startswith("1 loss-scaler overflow") for note in log.notes)  # the scaler's, on their own
    # the overflow printed inside step 150 is counted there, with the scale it left
    assert (
        log.records[149][1]["loss_scale_overflows"] == 1 and log.records[149][1]["loss_scale_after_overflow"] == 32768
    )
    assert "loss_scale_overflows" not in log.records[150][1]


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


# The loss scaler's lines as DeepSpeed prints them (deepspeed/runtime/fp16/loss_scaler.py update_scale; the fp16
# optimizers; ZeRO's older "[deepscale]"), copied from public logs with their logger prefix.
PREFIX = "[2023-07-24 13:21:32,378] [INFO] [loss_scaler.py:183:update_scale] "
SCALER = [
    PREFIX + "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 4294967296, reducing to 2147483648\n",
    PREFIX + "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 2147483648, but hysteresis is 2. "
    "Reducing hysteresis to 1\n",
    " [deepscale] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 2147483648, reducing to 1073741824.0\n",
    "[2026-06-18 23:36:56,643] [INFO] [unfused_optimizer.py:207:step] [deepspeed] fp16 dynamic loss scale overflow! "
    "Skipping step. Attempted loss scale: 1073741824.0, reducing to 536870912.0\n",
]
REPORT = (
    "[2023-07-24 13:21:33,000] [INFO] [logging.py:96:log_dist] [Rank 0] step={s}, skipped={k}, lr=[{lr}], "
    "mom=[(0.9, 0.999)]\n"
)


def _fp16_log(path, n=60):
    """Four overflows while the scale searches down (before step 1's report), then one at step 40."""
    lines = list(SCALER)
    skipped = len(SCALER)
    for s in range(1, n + 1):
        if s == 40:
            lines.append(
                PREFIX + "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 536870912.0, "
                "reducing to 268435456.0\n"
            )
            skipped += 1
        lines.append(REPORT.format(s=s, k=skipped, lr=1e-4))
        lines.append(STEPS.format(s=s, loss=3.0 - s / 1000))
    path.write_text("".join(lines))


def test_the_loss_scalers_overflows_are_counted_at_the_step_they_came_in_with_the_scale_they_left(tmp_path):
    path = tmp_path / "train.log"
    _fp16_log(path)
    log = read_log(path)
    first, at_40, at_41 = log.records[0][1], log.records[39][1], log.records[40][1]
    assert first["loss_scale_overflows"] == 4 and first["loss_scale_after_overflow"] == 536870912.0
    assert first["skipped_steps"] == 4 and at_40["skipped_steps"] == 5
    assert at_40["loss_scale_overflows"] == 1 and at_40["loss_scale_after_overflow"] == 268435456.0
    assert "loss_scale_overflows" not in at_41
    assert any("5 loss-scaler overflow line(s)" in n and "from 4294967296 to 268435456.0" in n for n in log.notes)
    result = examine_log(path)  # a fp16 run's skips are no finding; its columns are in the summary
    assert result.summary["counts"]["critical"] == 0
    assert {"loss_scale_overflows", "skipped_steps", "lr"} <= set(result.summary["signals"])


def test_hysteresis_keeps_the_scale():
    from keel.doctor.deepspeed_log import ScalerOverflows

    scaler = ScalerOverflows()
    scaler.add(SCALER[1])
    assert scaler.since_last_step() == {"loss_scale_overflows": 1, "loss_scale_after_overflow": "2147483648"}
    assert scaler.since_last_step() == {}


@pytest.mark.parametrize(
    "line",
    [
        "[Rank 0] Overflow detected. Skipping step. Attempted loss scale: nan, reducing to inf\n",
        "[Rank 0] Overflow detected. Skipping step.\n",  # no scale told
        "[Rank 0] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: " + "9" * 400 + ", reducing to x\n",
        "[Rank 0] step=3, skipped=1, lr=[], mom=[]\n",  # no learning rate
        "[Rank 0] step=3, skipped=1, lr=[warmup, 1e-4], mom=[]\n",
        "[Rank 0] step=99999999999999999999, skipped=1, lr=[0.1]\n",  # a step past int64: not a report
        "[Rank 0] step=3, skipped=1, lr=[" + "1," * 3000 + "\n",  # unclosed
    ],
)
def test_hostile_scaler_and_report_lines_are_read_or_left_out(tmp_path, line):
    path = tmp_path / "train.log"
    path.write_text(STEPS.format(s=2, loss=2.0) + line + STEPS.format(s=3, loss=2.0))
    log = read_log(path, format="deepspeed")
    assert [step for step, _ in log.records] == [2, 3]
    examine_log(path, format="deepspeed")


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from("step=skipd,lr[]0123456789.e- \tOVERFLOW!Attempted loss scale:"), max_size=120))
def test_any_report_or_scaler_like_line_is_read_or_one_clear_error(tmp_path_factory, middle):
    path = tmp_path_factory.mktemp("ds") / "train.log"
    path.write_text(STEPS.format(s=1, loss=2.0) + "[Rank 0] " + middle + "\n" + STEPS.format(s=5, loss=2.0))
    try:
        log = read_log(path, format="deepspeed")
    except LogReadError:
        return
    assert log.records[0][0] == 1
