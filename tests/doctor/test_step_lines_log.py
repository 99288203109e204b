"""karpathy-style text logs — build-nanogpt's ``log.txt`` (``STEP NAME VALUE``) and llm.c's ``main.log``
(``s:STEP trl:VALUE``) — read by ``keel doctor`` with the Guard's detectors, and hostile variants of them."""

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError


def _build_nanogpt_log(losses, *, val_every=50):
    lines = []
    for step, loss in enumerate(losses):
        if step % val_every == 0:
            lines.append(f"{step} val {loss + 0.05:.4f}")
            lines.append(f"{step} hella 0.2500")
        lines.append(f"{step} train {loss:.6f}")
    return "\n".join(lines) + "\n"


def test_build_nanogpt_log_txt_is_read_with_train_as_loss_and_val_as_val_loss(tmp_path):
    p = tmp_path / "log.txt"
    p.write_text("0 val 5.5036\n0 hella 0.2500\n0 train 5.502185\n1 train 5.526621\n2 train nan\n")
    assert detect_format(p) == "karpathy_text"
    log = read_log(p)
    assert [s for s, _ in log.records] == [0, 1, 2]  # the val, hella and train lines of step 0 are one record
    obs = build_timeline(log).observations
    assert obs[0].values == {"val/loss": 5.5036, "hella": 0.25, "loss": 5.502185}
    assert obs[1].values == {"loss": 5.526621}
    assert math.isnan(obs[2].values["loss"])


def test_llmc_main_log_is_read_with_trl_as_loss_and_tel_as_val_loss(tmp_path):
    p = tmp_path / "main.log"
    p.write_text("s:0 tel:11.0098\ns:0 trl:11.0100\ns:1 trl:9.8761\ns:250 tel:6.10 eval:0.251\n")
    assert detect_format(p) == "karpathy_text"
    obs = build_timeline(read_log(p)).observations
    assert [o.step for o in obs] == [0, 1, 250]
    assert obs[0].values == {"val/loss": 11.0098, "loss": 11.01}
    assert obs[2].values == {"val/loss": 6.10, "eval": 0.251}


def test_llmc_norm_is_the_gradient_norm_and_unit_suffixed_values_keep_their_unit_in_the_name(tmp_path):
    # llm.c logger.h: "s:%d trl:%.4f lr:%.6f norm:%.2f"
    # a time unit after a value, as train_time:1234ms (modded-nanogpt writes "step:N/TOTAL ...": test_speedrun_log)
    p = tmp_path / "main.log"
    p.write_text("s:1 trl:10.9877 lr:0.000006 norm:15.31\ns:2 trl:9.8 train_time:1234ms step_avg:617.00ms\n")
    obs = build_timeline(read_log(p)).observations
    assert obs[0].values == {"loss": 10.9877, "lr": 0.000006, "grad/norm": 15.31}
    assert obs[1].values == {"loss": 9.8, "train_time_ms": 1234.0, "step_avg_ms": 617.0}


def test_doctor_names_a_loss_spike_in_a_build_nanogpt_log(tmp_path, capsys):
    losses = [3.0 + 0.01 * (s % 5) for s in range(80)]
    losses[60] = 9.0
    p = tmp_path / "log.txt"
    p.write_text(_build_nanogpt_log(losses))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "karpathy_text" in out and "loss_spike" in out and "      60  critical" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 train 5.5\nsome words here\n", "line 2"),  # a stray line is named, not guessed at
        ("0 train 5.5\n1 train\n", "line 2"),
        ("s:0 trl:5.5\ns:x trl:5.4\n", "line 2"),
        ("0 train 5.5\n-3 train 5.4\n", "line 2"),
    ],
)
def test_a_malformed_line_is_one_error_naming_its_line(tmp_path, text, message):
    p = tmp_path / "log.txt"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="karpathy_text")


def test_text_that_is_not_a_step_log_is_still_an_unknown_format(tmp_path, capsys):
    p = tmp_path / "notes.txt"
    p.write_text("training went fine today\n")
    assert main(["doctor", str(p)]) == 2
    assert "unknown log format" in capsys.readouterr().err


_line = st.one_of(
    st.tuples(st.integers(0, 10**6), st.sampled_from(["train", "val", "hella"]), st.floats(allow_nan=True)).map(
        lambda t: f"{t[0]} {t[1]} {t[2]!r}"
    ),
    st.tuples(st.integers(0, 10**6), st.sampled_from(["trl", "tel"]), st.floats(allow_nan=True)).map(
        lambda t: f"s:{t[0]} {t[1]}:{t[2]!r}"
    ),
    st.text(max_size=20),
)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, min_size=1, max_size=12))
@example(lines=["0 train inf", "0 train -inf"])
def test_any_text_is_read_or_refused_with_one_log_read_error(tmp_path, lines):
    p = tmp_path / "log.txt"
    p.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        log = read_log(p, format="karpathy_text")
    except LogReadError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
    else:
        steps = [s for s, _ in log.records]
        assert steps and all(s >= 0 for s in steps)


def test_a_build_nanogpt_log_folder_is_read_from_its_log_txt(tmp_path, capsys):
    # build-nanogpt writes log/log.txt next to its model_*.pt checkpoints; `keel doctor log/` should read it
    (tmp_path / "log.txt").write_text("0 val 5.50\n0 train 5.49\n1 train 5.31\n")
    (tmp_path / "model_00001.pt").write_bytes(b"PK\x03\x04")
    assert detect_format(tmp_path) == "karpathy_text"
    assert [s for s, _ in read_log(tmp_path).records] == [0, 1]
    assert main(["doctor", str(tmp_path)]) == 0


def test_a_folder_whose_log_txt_is_prose_is_still_a_folder_with_no_log(tmp_path, capsys):
    (tmp_path / "log.txt").write_text("started training\n")
    assert main(["doctor", str(tmp_path)]) == 2
    assert "no training log" in capsys.readouterr().err
