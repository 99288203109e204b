"""``step N | name:value ...`` logs (torchtune's DiskLogger/StdoutLogger, NeMo Automodel's console) read by
``keel doctor`` with the Guard's detectors, and hostile variants. Both were "unknown log format" before."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, examine_log, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

# torchtune's recipe start: its logging lines and the DiskLogger's path, then one line per step
TORCHTUNE_BANNER = [
    "DEBUG:torchtune.utils._logging:Setting manual seed to local seed 1234. Local seed is seed + rank = 1234 + 0",
    "Writing logs to /tmp/torchtune/llama3_2_1B/full_single_device/logs/log_1733500000.txt",
    "INFO:torchtune.utils._logging:Model is initialized with precision torch.bfloat16.",
]


def _loss(step: int) -> float:
    return 0.9 + 1.2 * math.exp(-step / 20) + 0.04 * math.sin(step * 2.3)


def _torchtune(step: int, loss: float, grad_norm: str = "tensor(0.9512, device='cuda:0')") -> str:
    # DiskLogger.log_dict: "Step N | " then "name:value " per field (a trailing space), a tensor printed as itself
    return f"Step {step} | loss:{loss} lr:2e-05 tokens_per_second_per_gpu:{400 + step} grad_norm:{grad_norm} "


def _automodel(step: int, loss: float) -> str:
    return (
        f"2026-08-10 15:49:02 | INFO | root | step {step} | epoch 0 | loss {loss:.4f} | grad_norm 1.2398 | "
        f"lr 1.00e-05 | mem 25.49 GiB | tps 10144.41(1268.05/gpu) | num_label_tokens 25518"
    )


def test_a_torchtune_log_gives_loss_lr_and_the_grad_norm_tensor(tmp_path):
    p = tmp_path / "log_1733500000.txt"
    p.write_text("\n".join([*TORCHTUNE_BANNER, _torchtune(1, 2.0853), _torchtune(2, 1.8718)]) + "\n")
    assert detect_format(p) == "step_fields"
    log = read_log(p)
    first, second = build_timeline(log).observations
    assert (first.step, second.step) == (1, 2)
    assert first.values["loss"] == 2.0853 and first.values["lr"] == 2e-5 and first.values["grad/norm"] == 0.9512
    assert first.values["tokens_per_second_per_gpu"] == 401
    assert "3 lines that are not step lines left out" in log.notes


def test_a_nemo_automodel_line_gives_its_fields_with_units_joined(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("2026-08-10 15:48:50 | INFO | root | Starting\n" + _automodel(13, 0.6407) + "\n")
    assert detect_format(p) == "step_fields"
    (obs,) = build_timeline(read_log(p)).observations
    assert obs.step == 13 and obs.values["loss"] == 0.6407 and obs.values["grad/norm"] == 1.2398
    assert obs.values["lr"] == 1e-5 and obs.values["mem_gib"] == 25.49 and obs.values["tps"] == 10144.41


@pytest.mark.parametrize("shape", [_torchtune, _automodel])
def test_a_spike_is_found_at_its_step_and_a_healthy_run_is_quiet(tmp_path, shape, capsys):
    healthy = [shape(s, _loss(s)) for s in range(1, 301)]
    spiked = [shape(s, 7.0 if s == 200 else _loss(s)) for s in range(1, 301)]
    (tmp_path / "healthy.log").write_text("\n".join(healthy) + "\n")
    (tmp_path / "spiked.log").write_text("\n".join(spiked) + "\n")
    assert not examine_log(tmp_path / "healthy.log").findings
    assert [f.step for f in examine_log(tmp_path / "spiked.log").findings if f.kind == "loss_spike"] == [200]
    assert main(["doctor", "--fail-on", "warning", str(tmp_path / "spiked.log")]) == 1
    assert "loss_spike" in capsys.readouterr().out


def test_text_fields_are_left_out_and_counted_and_a_rank_copy_is_dropped(tmp_path):
    p = tmp_path / "train.log"
    line = "step 5 | epoch 0/3 | loss 2.5 | time 12:03:04 | acc 50%"
    p.write_text("\n".join([line, line, "step 6 | loss=2.4, lr=3e-4"]) + "\n")
    log = read_log(p)
    assert [(s, v) for s, v in log.records] == [(5, {"loss": 2.5, "acc_percent": 50.0}), (6, {"loss": 2.4, "lr": 3e-4})]
    assert "1 step lines that repeat the line before (other ranks) left out" in log.notes
    assert any(n.startswith("4 words of step lines") for n in log.notes), log.notes


@pytest.mark.parametrize(
    "text",
    [
        "step,loss\n1,2.0\n2,1.9\n",  # a CSV stays CSV
        "Step 1 of the tutorial | read the docs\nsee loss below\n",  # prose: no number after 'step N |'
        "iter 10: loss 2.0, time 5.0ms, mfu 10.00%\n",  # nanoGPT
    ],
)
def test_other_logs_are_not_taken_for_step_field_logs(tmp_path, text):
    p = tmp_path / "x.txt"
    p.write_text(text)
    try:
        assert detect_format(p) != "step_fields"
    except LogReadError:
        pass


def test_a_log_without_a_step_line_is_one_error(tmp_path):
    p = tmp_path / "log.txt"
    p.write_text("\n".join(TORCHTUNE_BANNER) + "\nStep 3 | nothing here\n")
    with pytest.raises(LogReadError, match=r"no 'step N \| name:value ...' line"):
        read_log(p, format="step_fields")


_LINE = st.one_of(
    st.text(alphabet="Step |lo:s=tensor(,)GiB%0123456789.-e ", max_size=60),
    st.builds(
        lambda s, v, g: f"Step {s} | loss:{v} grad_norm:tensor({g}, device='cuda:0') ",
        st.one_of(st.integers(-5, 10**7), st.just("1e30"), st.just("99999999999999999999")),
        st.one_of(st.floats(allow_nan=True), st.just("1E+999"), st.just("nan")),
        st.one_of(st.floats(allow_nan=True), st.just("-inf"), st.just("1,2")),
    ),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "step_fields")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        "Step 1 | loss:2.0" + " x:1" * 16_000,  # many fields: read
        "Step 1 | loss:2.0 " + "a" * 100_000,  # a word that is no field
        "Step 1 | loss:" + "tensor(" * 20_000,
        "Step 1 | " * 12_500 + "loss",
        "step 1 | " + "| " * 50_000,
    ],
)
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "log.txt"
    p.write_text(_torchtune(1, 2.0) + "\n" + line + "\n")
    assert detect_format(p) == "step_fields"
    assert len(read_log(p).records) >= 1
