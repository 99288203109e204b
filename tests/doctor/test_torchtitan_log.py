"""torchtitan stdout logs (``step: N  loss: X  grad_norm: G  memory: ...  tps: ...  mfu: ...``, ANSI-coloured) read
by ``keel doctor`` with the Guard's detectors, and hostile variants."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

PREFIX = "[rank0]:[titan] 2025-03-01 10:00:01,123 - root - INFO - "
RED, GREEN, ORANGE, TURQUOISE, BLUE, CYAN, MAGENTA, RESET = (f"\x1b[{n}m" for n in (31, 32, 33, 36, 34, 96, 35, 39))
BANNER = [
    f"{PREFIX}Starting job: Llama 3 debug training",
    f"{PREFIX}Building llama3 debugmodel with {{'dim': 256, 'n_layers': 6}}",
    f"{PREFIX}Training starts at step 1, with local batch size 8, global batch size 64, sequence length 2048",
]


def _line(step, loss, *, grad_norm=1.0, prefix=PREFIX, mfu="12.50%"):
    """A step line as torchtitan's metrics processor prints it (2025: with grad_norm and tflops)."""
    return (
        f"{prefix}{RED}step: {step:2}  {GREEN}loss: {loss:8.5f}  {ORANGE}grad_norm: {grad_norm:7.4f}  "
        f"{TURQUOISE}memory: 12.34GiB(15.61%)  {BLUE}tps: 8,123  {CYAN}tflops: 1,123.45  {MAGENTA}mfu: {mfu}{RESET}"
    )


def _validate_line(step, loss):
    return (
        f"{PREFIX}{ORANGE}validate step: {step:2}  {GREEN}loss: {loss:7.4f}  {TURQUOISE}memory: 9.00GiB(11.20%)  "
        f"{BLUE}tps: 20,480{RESET}"
    )


def _log(lines):
    return "\n".join([*BANNER, *lines]) + "\n"


def test_a_coloured_step_line_gives_loss_grad_norm_and_the_throughput_fields(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_log([_line(1, 12.25, grad_norm=4.5), _line(2, 11.5)]))
    assert detect_format(p) == "torchtitan"
    log = read_log(p)
    first, second = build_timeline(log).observations
    assert (first.step, second.step) == (1, 2)
    assert first.values["loss"] == 12.25 and first.values["grad/norm"] == 4.5
    assert first.values["tps"] == 8123 and first.values["tflops"] == 1123.45 and first.values["mfu_percent"] == 12.5
    assert first.values["memory_gib"] == 12.34 and first.values["memory_percent"] == 15.61
    assert any(n.startswith("3 lines that are not step or validate lines") for n in log.notes), log.notes


def test_a_validate_line_gives_val_loss_at_its_step(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_log([_line(10, 7.5), _validate_line(10, 7.25), _line(20, 7.0)]))
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert obs[10]["val/loss"] == 7.25 and obs[10]["loss"] == 7.5 and "val/loss" not in obs[20]
    assert obs[10]["val_tps"] == 20480


def test_older_and_forked_lines_without_colour_are_read(tmp_path):
    # before grad_norm was printed (wps, no tflops), a fork's lr, one that glues grad_norm to the mfu, N/A for mfu
    titan = "[titan] 2024-06-01 10:00:01,123 - root - INFO - "
    old = f"{titan}step:  1  loss: 10.8184  memory:  5.95GiB(7.52%)  wps: 1,021  mfu: 0.09%"
    lr = f"{titan}step:  2  loss: 10.5000  lr: 0.000300  memory:  5.95GiB(7.52%)  "
    glued = f"{titan}step:  3  loss: 10.2500  memory:  5.95GiB(7.52%)  tps: 1,021  mfu: 0.09%grad_norm: 2.50"
    na = _line(4, 10.0, prefix=titan, mfu="N/A")
    named = f"{titan}step: 5 loss:  9.7500 memory/max_active(GiB): 12.5 memory/max_active(%): 20.25"
    p = tmp_path / "train.log"
    p.write_text("\n".join([old, lr, glued, na, named]) + "\n")
    assert detect_format(p) == "torchtitan"
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert obs[1]["loss"] == 10.8184 and obs[1]["wps"] == 1021 and obs[1]["mfu_percent"] == 0.09
    assert obs[2]["lr"] == 0.0003 and obs[3]["grad/norm"] == 2.5
    assert obs[4]["loss"] == 10.0 and "mfu_percent" not in obs[4]
    assert (
        obs[5]["loss"] == 9.75 and obs[5]["memory/max_active(gib)"] == 12.5 and obs[5]["memory/max_active(%)"] == 20.25
    )


def test_the_first_ranks_lines_are_read_and_other_ranks_counted(tmp_path):
    rank1 = PREFIX.replace("[rank0]", "[rank1]")
    p = tmp_path / "train.log"
    for node in ("", "0: "):  # srun's label before torchrun's tag
        lines = [_line(1, 9.0), _line(1, 9.0, prefix=rank1), _line(2, 8.5), _line(2, 8.5, prefix=rank1)]
        p.write_text(_log([node + line for line in lines]))
        log = read_log(p)
        assert [s for s, _ in log.records] == [1, 2]
        assert any(n.startswith("2 step lines of other ranks than [rank0]") for n in log.notes), log.notes


def test_untagged_ranks_copies_of_a_line_are_read_once_and_a_restart_is_kept(tmp_path):
    # as a log of 8 ranks without torchrun's tags quotes them: each step line 8 times, only the throughput differs
    titan = "[titan] 2026-01-16 02:42:48,277 - root - INFO - "
    lines = []
    for step, loss in ((1, 12.4699), (20, 11.8347), (40, 9.3507), (20, 11.9)):  # the last: a resumed run
        for rank in range(8):
            lines.append(
                f"{titan}validate step: {step:2}  loss: {loss:7.4f}  memory: 69.81GiB(88.17%)  tps: 74,60{rank}"
            )
            lines.append(f"{titan}step: {step:2}  loss: {loss:7.4f}  grad_norm:  4.6875  tps: 40,89{rank}")
    p = tmp_path / "train.log"
    p.write_text("\n".join(lines) + "\n")
    log = read_log(p)
    assert [s for s, _ in log.records] == [1, 20, 40, 20]
    assert dict(log.records)[40] == {
        "val_loss": 9.3507,
        "val_memory_gib": 69.81,
        "val_memory_percent": 88.17,
        "val_tps": 74600,
        "loss": 9.3507,
        "grad_norm": 4.6875,
        "tps": 40890,
    }
    assert any(n.startswith("56 step lines that repeat the step and loss") for n in log.notes), log.notes


def test_doctor_names_a_gradient_spike_and_a_nan_loss_in_a_torchtitan_log(tmp_path, capsys):
    lines = []
    for step in range(1, 201):
        loss = math.nan if step == 180 else 6.0 * math.exp(-step / 80) + 3.0 + 0.02 * (step % 3)
        lines.append(_line(step, loss, grad_norm=40.0 if step == 120 else 1.0 + 0.01 * (step % 4)))
    p = tmp_path / "train.log"
    p.write_text(_log(lines))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "(torchtitan, 200 steps" in out
    assert "     120  critical  grad_spike" in out and "     180  critical  non_finite" in out


@pytest.mark.parametrize(
    "text",
    [
        f"{PREFIX}step: 1  loss:\n",  # no value
        f"{PREFIX}step: 1  loss: 2.0  memory: lots\n",
        f"{PREFIX}step: 1  loss: 2.0  and then some words\n",
        f"{PREFIX}step: 1  loss: 2.0  grad_norm: 1.0 |\n",
    ],
)
def test_a_malformed_step_line_is_one_error_naming_it(tmp_path, text):
    p = tmp_path / "train.log"
    p.write_text("\n".join(BANNER) + "\n" + text)
    with pytest.raises(LogReadError, match=r"line 4 .*torchtitan"):
        read_log(p, format="torchtitan")


def test_a_log_without_a_step_line_is_one_error(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("\n".join(BANNER) + "\n")
    with pytest.raises(LogReadError, match="no 'step: N  loss: X' line"):
        read_log(p, format="torchtitan")


_LINE = st.one_of(
    st.text(alphabet="step: lo,sGiB(%)0123456789.-\x1b[m", max_size=60),
    st.builds(
        lambda s, v, g: f"{PREFIX}step: {s}  loss: {v}  grad_norm: {g}",
        st.one_of(st.integers(-5, 10**7), st.just("1e30")),
        st.one_of(st.floats(allow_nan=True), st.just("1E+999"), st.just("nan")),
        st.one_of(st.floats(allow_nan=True), st.just("-inf"), st.just("1,2,3")),
    ),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "torchtitan")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        "step: 1  loss: 2.0" + "  x: 1" * 16_000,  # many fields: read
        "step: 1  loss: 2.0  " + "a" * 100_000,  # a field that never gets its colon
        " step: 1  loss: 2.0  tps: " + "9," * 50_000,
        "\x1b[" + "1;" * 50_000,
        " step: 1 " * 12_500,
    ],
)
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text(_line(1, 2.0) + "\n" + line + "\n")
    detect_format(p)
    try:
        assert len(read_log(p, format="torchtitan").records) >= 1
    except LogReadError as exc:
        assert "line 2" in str(exc)
