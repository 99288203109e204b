"""modded-nanogpt speedrun logs (``records/*/<uuid>.txt``): the script's own source and ``nvidia-smi`` first, then
``step:N/TOTAL name:value ...`` lines — read by ``keel doctor`` with the Guard's detectors, and hostile variants."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError

# what train_gpt2.py writes before its first step: its own source (which holds "step:" inside f-strings), a rule,
# nvidia-smi's table, a rule
_HEADER = """\
====================================================================================================
import os
with open(sys.argv[0]) as f:
    code = f.read() # read the code of this file ASAP, for logging
        print0(f"step:{step+1}/{args.num_iterations} train_loss:{train_loss.item():.4f} train_time:{t:.0f}ms")
====================================================================================================
Running pytorch 2.5.0 compiled for CUDA 12.4
nvidia-smi:
+-----------------------------------------+----------------------+----------------------+
|   0  NVIDIA H100 80GB HBM3          On  | 00000000:19:00.0 Off |                    0 |
+-----------------------------------------+----------------------+----------------------+

====================================================================================================
"""


def _speedrun_log(losses, *, total=None, val_every=50):
    total = total or len(losses)
    lines = [f"step:0/{total} val_loss:{losses[0] + 0.05:.4f} train_time:285ms step_avg:nanms"]
    for step, loss in enumerate(losses[1:], start=1):
        lines.append(f"step:{step}/{total} train_loss:{loss:.4f} train_time:{1000 + 200 * step}ms step_avg:nanms")
        if step % val_every == 0:
            lines.append(
                f"step:{step}/{total} val_loss:{loss + 0.05:.4f} train_time:{1000 + 200 * step}ms step_avg:1ms"
            )
    return _HEADER + "\n".join(lines) + "\npeak memory consumption: 31232 MiB\n"


def test_a_speedrun_log_is_detected_past_its_source_code_and_nvidia_smi_header(tmp_path):
    p = tmp_path / "eb5659d0-fb6a-49e5-a311-f1f89412f726.txt"
    p.write_text(_speedrun_log([10.9, 8.7, 7.8, 7.5]))
    assert detect_format(p) == "modded_nanogpt"
    obs = build_timeline(read_log(p)).observations
    assert [o.step for o in obs] == [0, 1, 2, 3]
    assert obs[0].values["val/loss"] == pytest.approx(10.95)
    assert obs[1].values["loss"] == 8.7 and obs[1].values["train_time_ms"] == 1200.0
    assert math.isnan(obs[1].values["step_avg_ms"])  # "nanms", as the first steps write it


def test_the_train_and_val_lines_of_one_step_make_one_record(tmp_path):
    # the last step writes train_loss and then val_loss, both with the clock: not a restart
    p = tmp_path / "run.txt"
    p.write_text(_speedrun_log([5.0, 4.0, 3.0, 2.0], val_every=3))
    log = read_log(p)
    assert [s for s, _ in log.records] == [0, 1, 2, 3]
    last = build_timeline(log).observations[-1].values
    assert last["loss"] == 2.0 and last["val/loss"] == pytest.approx(2.05)
    assert not any("restart" in note for note in log.notes)


def test_later_speedrun_logs_with_only_the_clock_and_val_loss_are_read(tmp_path):
    # since 2025 the records log only train_time each step and val_loss every 125 steps
    lines = [f"step:{s}/300 train_time:{80 * s}ms step_avg:80.00ms" for s in range(1, 301)]
    lines.insert(125, "step:125/300 val_loss:4.5 train_time:10000ms step_avg:80.00ms")
    p = tmp_path / "run.txt"
    p.write_text("import os\nimport sys\n" + "\n".join(lines) + "\n")
    assert detect_format(p) == "modded_nanogpt"
    obs = build_timeline(read_log(p)).observations
    assert len(obs) == 300 and obs[124].values["val/loss"] == 4.5


def test_doctor_names_a_loss_spike_in_a_speedrun_log(tmp_path, capsys):
    losses = [3.0 + 0.01 * (s % 5) for s in range(120)]
    losses[90] = 9.0
    p = tmp_path / "run.txt"
    p.write_text(_speedrun_log(losses))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "modded_nanogpt" in out and "loss_spike" in out and "      90  critical" in out


def test_a_healthy_speedrun_log_has_no_finding_from_its_nan_step_avg(tmp_path, capsys):
    # step_avg is "nan" for the first steps of every record: a clock's placeholder, not a non-finite signal
    losses = [3.0 + 0.01 * (s % 5) for s in range(120)]
    p = tmp_path / "run.txt"
    p.write_text(_speedrun_log(losses))
    assert main(["doctor", str(p), "--fail-on", "warning"]) == 0
    assert "non_finite" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("step:1/10 train_loss:5.5\nstep:2/10 train_loss:\n", "line 2"),  # a broken step line is named
        ("step:1/10 train_loss:5.5\nstep:x/10 train_loss:5.4\n", "line 2"),
        ("step:1/10 train_loss:5.5\nstep:2/10 train_loss:5.4 oops\n", "line 2"),
        ("import os\nprint('hello')\n", "no 'step:N/TOTAL name:value' line"),
    ],
)
def test_a_malformed_step_line_is_one_error_naming_its_line(tmp_path, text, message):
    p = tmp_path / "run.txt"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="modded_nanogpt")


def test_an_empty_or_binary_file_forced_to_this_reader_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LogReadError, match="empty"):
        read_log(empty, format="modded_nanogpt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"step:1/2 train_loss:1\x00\x01")
    with pytest.raises(LogReadError, match="binary"):
        read_log(binary, format="modded_nanogpt")


_LINE = st.one_of(
    st.text(alphabet="step:/0123456789 abcdefghijklmnopqrstuvwxyz._-nanms\t", max_size=40),
    st.builds(
        lambda s, t, v: f"step:{s}/{t} train_loss:{v} train_time:{s}ms",
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.one_of(st.floats(allow_nan=True), st.just("nan"), st.just("1e999")),
    ),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    p = tmp_path / "fuzz.txt"
    p.write_text("\n".join(lines) + "\n")
    try:
        log = read_log(p, format="modded_nanogpt")
    except LogReadError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
    else:
        assert len(log.records) >= 1


def test_a_signal_missing_from_the_log_is_said_once_with_every_detector_it_leaves_idle(tmp_path, capsys):
    # the 2025+ records log no train_loss: loss_spike and divergence both go without it, said on one line
    lines = [f"step:{s}/300 train_time:{80 * s}ms step_avg:80.00ms" for s in range(1, 301)]
    p = tmp_path / "run.txt"
    p.write_text("\n".join(lines) + "\n")
    assert main(["doctor", str(p)]) == 0
    missing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss is not in this log")]
    assert missing == ["loss is not in this log: no loss_spike or divergence detection"]
