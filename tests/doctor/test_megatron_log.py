"""Megatron-LM / Megatron-DeepSpeed / NeMo stdout logs (`` iteration N/ TOTAL | name: value | ...``) read by
``keel doctor`` with the Guard's detectors, and hostile variants."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

# a line as BLOOM's tr8b-104B chronicles quote it (Megatron-DeepSpeed)
BLOOM_LINE = (
    " iteration     6502/  159576 | consumed samples:       216960 | consumed tokens:    444334080 | elapsed time per"
    " iteration (ms): 31074.1 | learning rate: 5.997E-05 | global batch size:    80 | lm loss: 3.876781E+00 | loss"
    " scale: 4096.0 | grad norm: 3246.595 | num zeros: 0.0 | number of skipped iterations:   0 | number of nan"
    " iterations:   0 |"
)


def _line(step, loss, *, grad_norm=1.0, prefix="", total=1000):
    return (
        f"{prefix} iteration {step:>8}/{total:>8} | consumed samples: {step * 64:>12} | elapsed time per iteration "
        f"(ms): 812.5 | learning rate: 3.000E-04 | global batch size:    64 | lm loss: {loss:.6E} | loss scale: 1.0 | "
        f"grad norm: {grad_norm:.3f} | number of skipped iterations:   0 | number of nan iterations:   0 |"
    )


def _megatron_log(losses, *, prefix="", val_every=50):
    lines = ["using world size: 8, data-parallel size: 8", "> building GPT model ...", "training ..."]
    for step, loss in enumerate(losses, start=1):
        lines.append(_line(step, loss, prefix=prefix))
        if step % val_every == 0:
            lines.append("-" * 60)
            lines.append(
                f" validation loss at iteration {step} | lm loss value: {loss + 0.1:.6E} | lm loss PPL: "
                f"{math.exp(loss + 0.1):.6E} | "
            )
            lines.append("-" * 60)
    return "\n".join(lines) + "\n"


def test_a_megatron_deepspeed_line_from_bloom_is_read_with_its_loss_grad_norm_lr_and_loss_scale(tmp_path):
    p = tmp_path / "main_log.txt"
    p.write_text("some banner\n" + BLOOM_LINE + "\n")
    assert detect_format(p) == "megatron"
    (obs,) = build_timeline(read_log(p)).observations
    assert obs.step == 6502
    assert obs.values["loss"] == 3.876781 and obs.values["grad/norm"] == 3246.595
    assert obs.values["lr"] == 5.997e-05 and obs.values["amp/scale"] == 4096.0


def test_validation_lines_give_val_loss_at_their_iteration(tmp_path):
    p = tmp_path / "stdout.log"
    p.write_text(_megatron_log([3.0] * 60, val_every=50))
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert obs[50]["val/loss"] == pytest.approx(3.1) and obs[50]["loss"] == 3.0
    assert "val/loss" not in obs[49]


@pytest.mark.parametrize(
    "prefix",
    ["1: ", "[2026-01-16 07:32:24] ", "[20251202 06:56:28][rank-7/8][INFO ] [--------trainer.py:2560] : "],
)
def test_launcher_prefixes_before_iteration_are_allowed(tmp_path, prefix):
    p = tmp_path / "slurm-123.out"
    p.write_text(_megatron_log([3.0, 2.9, 2.8], prefix=prefix))
    assert detect_format(p) == "megatron"
    assert [s for s, _ in read_log(p).records] == [1, 2, 3]


def test_a_log_whose_first_line_opens_with_a_bracketed_timestamp_is_not_taken_for_json(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("[before the start of training step] datetime: 2024-04-09 09:51:29\n" + BLOOM_LINE + "\n")
    assert detect_format(p) == "megatron"
    p.write_text(
        "\n".join(
            _megatron_log([3.0, 2.9]).splitlines()[3:],
        ).replace(" iteration", "[2026-01-16] iteration")
    )
    assert detect_format(p) == "megatron"


def test_a_two_number_value_keeps_the_first(tmp_path):
    # ROCm Megatron writes "elapsed time per iteration (ms): 13100.0/13240.9" (this step / average)
    p = tmp_path / "log.txt"
    p.write_text(" iteration 4408/ 5000 | elapsed time per iteration (ms): 13100.0/13240.9 | lm loss: 4.1E-03 |\n")
    (obs,) = build_timeline(read_log(p)).observations
    assert obs.values["loss"] == 4.1e-03 and obs.values["elapsed_time_per_iteration_ms"] == 13100.0


def test_doctor_names_a_loss_spike_and_a_nan_in_a_megatron_log(tmp_path, capsys):
    losses = [3.0 + 0.01 * (s % 5) for s in range(120)]
    losses[90] = 9.0
    losses[110] = float("nan")
    p = tmp_path / "stdout.log"
    p.write_text(_megatron_log(losses))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "megatron" in out and "loss_spike" in out and "      91  critical" in out
    # bf16 Megatron prints "loss scale: 1.0" throughout: the NaN at 111 is not a loss scaler's skipped overflow
    assert "     111  critical  non_finite" in out and "loss_scale_overflow" not in out


def test_a_dynamic_loss_scale_is_kept(tmp_path):
    p = tmp_path / "stdout.log"
    p.write_text(BLOOM_LINE + "\n" + BLOOM_LINE.replace("6502/", "6503/").replace("4096.0", "2048.0") + "\n")
    assert [o.values["amp/scale"] for o in build_timeline(read_log(p)).observations] == [4096.0, 2048.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" iteration 1/ 10 | lm loss: 2.0 |\n iteration 2/ 10 | lm loss 2.0 |\n", "line 2"),
        (" iteration 1/ 10 | lm loss: 2.0 |\n iteration x/ 10 | lm loss: 2.0 |\n", "line 2"),
        ("using world size: 8\ntraining ...\n", "no ' iteration N/ TOTAL | name: value |' line"),
    ],
)
def test_a_malformed_iteration_line_is_one_error_naming_its_line(tmp_path, text, message):
    p = tmp_path / "stdout.log"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="megatron")


_LINE = st.one_of(
    st.text(alphabet="iteration/|: 0123456789.Elmosgradn-+\t", max_size=50),
    st.builds(
        lambda s, t, v, g: f" iteration {s}/ {t} | lm loss: {v} | grad norm: {g} |",
        st.integers(0, 10**7),
        st.integers(0, 10**7),
        st.one_of(st.floats(allow_nan=True), st.just("nan"), st.just("1E+999")),
        st.one_of(st.floats(allow_nan=True), st.just("-inf")),
    ),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "megatron")


@pytest.mark.timeout(20)  # a hang guard: backtracking over a long field once took minutes (quadratic)
@pytest.mark.parametrize("field", ["a" * 100_000, " " * 100_000 + "x"])
def test_a_huge_field_without_a_colon_is_one_error_not_a_hang(tmp_path, field):
    p = tmp_path / "stdout.log"
    p.write_text(f" iteration 1/ 2 | lm loss: 2.0 |\n iteration 2/ 2 |{field} |\n")
    with pytest.raises(LogReadError, match="line 2"):
        read_log(p)


@pytest.mark.timeout(20)  # 'iteration ' then 100,000 slashes took the candidate pattern O(n^2) (about 15 min)
def test_a_line_of_slashes_after_iteration_is_read_past_not_a_hang(tmp_path):
    p = tmp_path / "stdout.log"
    p.write_text(
        " iteration 1/ 2 | lm loss: 2.0 |\n iteration " + "/" * 100_000 + "\n iteration 2/ 2 | lm loss: 1.9 |\n"
    )
    assert len(read_log(p).records) == 2
