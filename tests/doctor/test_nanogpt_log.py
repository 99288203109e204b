"""karpathy/nanoGPT ``train.py``'s console output saved to a file (``python train.py ... > train.log``): ``iter N:
loss X, time Tms, mfu M%`` and ``step N: train loss X, val loss Y`` lines after a banner — read by ``keel doctor``."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

# what train.py prints before its first iteration (the first line has commas: it was read as a CSV header)
BANNER = """\
tokens per iteration will be: 16,384
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
Initializing a new model from scratch
number of parameters: 10.65M
num decayed parameter tensors: 26, with 10,740,096 parameters
using fused AdamW: True
compiling the model... (takes a ~minute)
"""


def _nanogpt_log(losses, *, eval_every=50):
    lines = []
    for step, loss in enumerate(losses):
        if step % eval_every == 0:
            lines.append(f"step {step}: train loss {loss - 0.02:.4f}, val loss {loss + 0.05:.4f}")
            if step:
                lines.append("saving checkpoint to out-shakespeare-char")
        mfu = -100.0 if step < 5 else 4.23
        lines.append(f"iter {step}: loss {loss:.4f}, time {88.01 if step else 29949.87:.2f}ms, mfu {mfu:.2f}%")
    return BANNER + "\n".join(lines) + "\n"


def test_nanogpt_stdout_is_detected_past_its_banner_and_read(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_nanogpt_log([4.26, 3.25, 2.9]))
    assert detect_format(p) == "nanogpt_stdout"
    obs = build_timeline(read_log(p)).observations
    assert [o.step for o in obs] == [0, 1, 2]
    assert obs[0].values["loss"] == 4.26 and obs[0].values["val/loss"] == pytest.approx(4.31)
    assert obs[0].values["train_eval_loss"] == pytest.approx(4.24)  # an estimate over eval batches, not the step's
    assert obs[1].values["time_ms"] == 88.01 and obs[1].values["mfu_percent"] == -100.0


def test_fields_that_forks_add_with_their_own_units_are_read(tmp_path):
    # a fork's line, as published: memory in G, lr, total time in s
    p = tmp_path / "train.log"
    p.write_text(
        "iter 2: loss 4.0429, time 26.42ms, mfu -100.00%, cuda memory 0.499G, lr 6.00e-04, total time 1.35s\n"
        "iter 0:    loss 11.07, time 4200ms, mfu 0.12%\n"
        "iter 5: loss 3.3399, time 18371.47ms, lr:0.0003 , mfu: 3.06%\n"  # another fork: "name: value"
    )
    first, second, third = build_timeline(read_log(p)).observations
    assert (
        first.values["cuda_memory_g"] == 0.499 and first.values["lr"] == 6e-4 and first.values["total_time_s"] == 1.35
    )
    assert second.values["loss"] == 11.07
    assert third.values["lr"] == 0.0003 and third.values["mfu_percent"] == 3.06


def test_doctor_names_a_loss_spike_in_nanogpt_stdout(tmp_path, capsys):
    losses = [2.0 + 0.01 * (s % 5) for s in range(120)]
    losses[90] = 7.0
    p = tmp_path / "train.log"
    p.write_text(_nanogpt_log(losses))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "nanogpt_stdout" in out and "      90  critical  loss_spike" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iter 0: loss 4.2, time 1.0ms, mfu 1.0%\niter 1: loss oops, time 1.0ms\n", "line 2"),
        ("iter 0: loss 4.2, time 1.0ms\nstep x: train loss 4.0, val loss 4.1\n", "line 2"),
        ("banner only\nno iterations\n", "no 'iter N: loss X' line"),
    ],
)
def test_a_malformed_iter_or_step_line_is_one_error_naming_its_line(tmp_path, text, message):
    p = tmp_path / "train.log"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="nanogpt_stdout")


_LINE = st.one_of(
    st.text(alphabet="iterstep:0123456789 ,.lossvaltimemsfu%-", max_size=40),
    st.builds(
        lambda s, v: f"iter {s}: loss {v}, time 1.00ms, mfu 2.00%",
        st.integers(0, 10**6),
        st.one_of(st.floats(allow_nan=True), st.just("nan")),
    ),
)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "nanogpt_stdout")


@pytest.mark.timeout(20)  # a hang guard: backtracking over a long run of spaces once took minutes (cubic)
@pytest.mark.parametrize("rest", ["loss" + " " * 100_000 + "x", "a " * 50_000])
def test_a_huge_iter_line_is_one_error_not_a_hang(tmp_path, rest):
    p = tmp_path / "train.log"
    p.write_text(f"iter 0: loss 1.0\niter 1: {rest}\n")
    with pytest.raises(LogReadError, match="line 2"):
        read_log(p)
