"""fairseq / metaseq stdout logs (``| train_inner |`` lines, ``--log-format json`` or ``simple``) read by
``keel doctor`` with the Guard's detectors, and hostile variants."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

STAMP = "2022-01-05 10:12:41 | INFO |"
BANNER = [
    f"{STAMP} fairseq_cli.train | model: TransformerLanguageModel, criterion: CrossEntropyCriterion",
    f"{STAMP} fairseq_cli.train | num. shared model params: 125,239,296 (num. trained: 125,239,296)",
]


def _json_line(step, loss, *, gnorm=1.0, scale=8.0):
    values = {"epoch": 1, "update": round(step / 500, 3), "loss": f"{loss:.3f}", "ppl": f"{2 ** min(loss, 60):.2f}"}
    values |= {"wps": "5120.3", "num_updates": str(step), "lr": "0.0003", "gnorm": f"{gnorm:.3f}"}
    values |= {"train_wall": "2", "wall": str(3 * step)} | ({"loss_scale": f"{scale:g}"} if scale else {})
    return f"{STAMP} train_inner | {json.dumps(values)}"


def _simple_line(step, loss, *, gnorm=1.0):
    return (
        f"{STAMP} train_inner | epoch 002:    {step % 500:>4} / 500 loss={loss:.3f}, ppl=12.4, wps=5120.3, "
        f"ups=1.2, num_updates={step}, lr=0.0003, gnorm={gnorm:.3f}, train_wall=2, wall={3 * step}"
    )


def _log(lines):
    return "\n".join([*BANNER, *lines]) + "\n"


def test_json_lines_give_loss_grad_norm_lr_and_loss_scale_at_num_updates(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_log([_json_line(10, 9.25, gnorm=3.5, scale=16.0), _json_line(20, 9.0)]))
    assert detect_format(p) == "fairseq"
    first, second = build_timeline(read_log(p)).observations
    assert (first.step, second.step) == (10, 20)
    assert first.values["loss"] == 9.25 and first.values["grad/norm"] == 3.5
    assert first.values["lr"] == 0.0003 and first.values["amp/scale"] == 16.0


def test_simple_lines_are_read_the_same(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_log([_simple_line(510, 4.125, gnorm=0.75), _simple_line(520, 4.0)]))
    assert detect_format(p) == "fairseq"
    first, _ = build_timeline(read_log(p)).observations
    assert first.step == 510 and first.values["loss"] == 4.125 and first.values["grad/norm"] == 0.75


def test_validation_lines_of_both_formats_give_val_loss_at_their_update(tmp_path):
    p = tmp_path / "train.log"
    valid_json = {"epoch": 1, "valid_loss": "4.5", "valid_ppl": "22.6", "valid_num_updates": "20"}
    p.write_text(_log([_json_line(10, 5.0), _json_line(20, 4.75), f"{STAMP} valid | {json.dumps(valid_json)}"]))
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert obs[20]["val/loss"] == 4.5 and obs[20]["loss"] == 4.75 and "val/loss" not in obs[10]
    simple_valid = f"{STAMP} valid | epoch 002 | valid on 'valid' subset | loss 4.25 | ppl 19 | num_updates 520"
    p.write_text(_log([_simple_line(510, 4.5), _simple_line(520, 4.375), simple_valid]))
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert obs[520]["val/loss"] == 4.25 and obs[520]["loss"] == 4.375


def test_another_validation_subset_keeps_its_name(tmp_path):
    p = tmp_path / "train.log"
    other = f"{STAMP} valid | epoch 002 | valid on 'wiki' subset | loss 4.25 | num_updates 520"
    p.write_text(_log([_simple_line(520, 4.375), other]))
    (obs,) = build_timeline(read_log(p)).observations
    assert obs.values["valid_wiki_loss"] == 4.25 and "val/loss" not in obs.values


def test_overflow_notes_and_other_lines_are_counted_not_read(tmp_path):
    note = "NOTE: gradient overflow detected, ignoring gradient, setting loss scale to: 4.0"
    overflow = f"{STAMP} fairseq.trainer | {note}"
    epoch_summary = f'{STAMP} train | {{"epoch": 1, "train_loss": "5.1", "train_num_updates": "20"}}'
    p = tmp_path / "train.log"
    p.write_text(_log([_json_line(10, 5.0), overflow, overflow, _json_line(20, 4.9, scale=4.0), epoch_summary]))
    log = read_log(p)
    assert [s for s, _ in log.records] == [10, 20]
    assert any(n.startswith("2 mixed-precision overflow lines") for n in log.notes), log.notes
    assert any(n.startswith("3 lines that are not train_inner") for n in log.notes), log.notes


def test_doctor_names_a_gradient_spike_and_a_nan_loss_in_a_bf16_fairseq_log(tmp_path, capsys):
    lines = []  # bf16: no loss scaler, so no loss_scale (with one, a NaN loss is read as the scaler's overflow)
    for step in range(1, 201):
        loss = math.nan if step == 180 else 6.0 * math.exp(-step / 80) + 3.0 + 0.02 * (step % 3)
        gnorm = 40.0 if step == 120 else 1.0 + 0.01 * (step % 4)
        lines.append(_json_line(step, loss, gnorm=gnorm, scale=None))
    p = tmp_path / "train.log"
    p.write_text(_log(lines))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "(fairseq, 200 steps" in out
    assert "     120  critical  grad_spike" in out and "     180  critical  non_finite" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'{STAMP} train_inner | {{"loss": "2.0"}}\n', "line 1"),  # no num_updates
        (f'{STAMP} train_inner | {{"loss": "2.0", "num_updates": "x"}}\n', "line 1"),
        (f"{STAMP} train_inner | {{not json\n", "line 1"),
        (f"{STAMP} train_inner | [1, 2]\n", "line 1"),
        (f"{STAMP} train_inner | epoch 001: 1 / 10 loss 2.0\n", "line 1"),
        (f"{STAMP} valid | epoch 001 | valid on 'valid' subset | loss\n", "line 1"),
        ("\n".join(BANNER) + "\n", "no '| train_inner |' line"),
    ],
)
def test_a_malformed_line_is_one_error_naming_it(tmp_path, text, message):
    p = tmp_path / "train.log"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="fairseq")


_LINE = st.one_of(
    st.text(alphabet='| train_inervalid{}":,=epoch0123456789.-', max_size=60),
    st.builds(
        lambda s, v, g: f'{STAMP} train_inner | {{"loss": "{v}", "num_updates": "{s}", "gnorm": "{g}"}}',
        st.one_of(st.integers(-5, 10**7), st.just("1e30"), st.just("inf"), st.just("nan")),
        st.one_of(st.floats(allow_nan=True), st.just("1E+999")),
        st.one_of(st.floats(allow_nan=True), st.just("-inf")),
    ),
    st.builds(
        lambda s, v: f"{STAMP} train_inner | epoch 001: 1 / 9 loss={v}, num_updates={s}",
        st.integers(0, 10**7),
        st.one_of(st.floats(allow_nan=True), st.text(max_size=5)),
    ),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "fairseq")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("line", ["|" + " " * 100_000, "| train_inner |" + " " * 100_000 + "x", "| " * 50_000])
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text(_json_line(1, 2.0) + "\n" + line + "\n")
    try:
        assert len(read_log(p, format="fairseq").records) == 1
    except LogReadError as exc:
        assert "line 2" in str(exc)


def test_a_log_that_opens_with_a_c10d_warning_in_brackets_is_not_taken_for_json(tmp_path):
    # torchrun / c10d print "[W socket.cpp:601] [c10d] ..." first: such a log was "not valid JSON" (reviewer W2)
    p = tmp_path / "train.log"
    p.write_text("[W socket.cpp:601] [c10d] The client socket has failed to connect.\n" + _log([_json_line(10, 5.0)]))
    assert detect_format(p) == "fairseq" and [s for s, _ in read_log(p).records] == [10]
