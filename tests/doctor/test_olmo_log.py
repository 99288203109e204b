"""OLMo (v1) and OLMo-core stdout logs (a ``[step=N/MAX]`` header, then indented ``name=value`` lines) read by
``keel doctor`` with the Guard's detectors, and hostile variants."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

PREFIX = "2024-02-01 10:00:00.000\tjupiter-cs-aus-105:0\tolmo.train:816\tINFO\t"  # OLMo's log line format
CORE_PREFIX = "2025-01-10 08:00:00.000\tnode-3:0\tolmo_core.train.callbacks.console_logger:85\tINFO\t"
BANNER = [f"{PREFIX}Configuration:", f"{PREFIX}Number of parameters: 1,176,764,416", f"{PREFIX}Starting training..."]


def _format_float(value):
    """OLMo's console formatting: thousands commas above 1000, str() below 1e-4 (as trainer.py does)."""
    if value < 0.0001:
        return str(value)
    if value > 1000:
        return f"{int(value):,d}"
    return (
        f"{value:.1f}"
        if value > 100
        else f"{value:.2f}"
        if value > 10
        else f"{value:.3f}"
        if value > 1
        else f"{value:.4f}"
    )


def _block(step, loss, *, grad_norm=1.0, total=739328):
    ppl = "nan" if math.isnan(loss) else _format_float(math.exp(min(loss, 50)))
    return [
        f"{PREFIX}[step={step}/{total}]",
        f"    train/CrossEntropyLoss={'nan' if math.isnan(loss) else _format_float(loss)}",
        f"    train/Perplexity={ppl}",
        f"    optim/total_grad_norm={_format_float(grad_norm)}",
        "    throughput/total_tokens=4,194,304",
        "    throughput/device/tokens_per_second=9,876",
        "    System/Peak GPU Memory (MB)=31,012",
    ]


def _log(blocks):
    return "\n".join(BANNER + [line for block in blocks for line in block]) + "\n"


def test_olmo_blocks_give_loss_grad_norm_and_thousands_at_their_step(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_log([_block(1, 11.05, grad_norm=4.5), _block(2, 10.5)]))
    assert detect_format(p) == "olmo"
    log = read_log(p)
    first, second = build_timeline(log).observations
    assert (first.step, second.step) == (1, 2)
    assert first.values["loss"] == 11.05 and first.values["grad/norm"] == 4.5
    assert (
        first.values["train/Perplexity"] == int(math.exp(11.05)) and first.values["throughput/total_tokens"] == 4194304
    )
    assert any(n.startswith("3 lines that are not step headers") for n in log.notes), log.notes


def test_olmo_core_blocks_map_ce_loss_grad_norm_and_lr(tmp_path):
    p = tmp_path / "train.log"
    lines = [
        f"{CORE_PREFIX}[step=10/1000,epoch=1,eta=2h3m]",
        "    train/CE loss=7.562",
        "    train/PPL=1,925",
        "    optim/total grad norm=0.8125",
        "    optim/LR (group 0)=3.00E-04",
        f"{CORE_PREFIX}[step=11/1000,epoch=1]",  # a progress line without metrics
        f"{CORE_PREFIX}[step=20/???,epoch=1,eta=2h2m]",
        "    train/CE loss=7.25",
    ]
    p.write_text("\n".join(lines) + "\n")
    assert detect_format(p) == "olmo"
    obs = {o.step: o.values for o in build_timeline(read_log(p)).observations}
    assert sorted(obs) == [10, 20]
    assert obs[10]["loss"] == 7.562 and obs[10]["grad/norm"] == 0.8125 and obs[10]["lr"] == 0.0003
    assert obs[20]["loss"] == 7.25


def test_a_coloured_header_and_a_forks_eta_with_spaces_are_read(tmp_path):
    # as a MolmoAct-style launcher's logging handler prints them (rich-style prefix, ANSI colour)
    header = "[2026-01-01 00:00:00] INFO [olmo.train.trainer:1306, rank=0] "
    lines = [
        f"{header}[step=15000/30000, eta=1 hour, 2 minutes]",
        "    train/CrossEntropyLoss=1.2345",
        f"\x1b[36m{header}[step=30000/30000, eta=1 minute]\x1b[0m",
        "    train/CrossEntropyLoss=1.25",
        "Traceback (most recent call last):",
    ]
    p = tmp_path / "train.log"
    p.write_text("\n".join(lines) + "\n")
    assert detect_format(p) == "olmo"
    assert list(read_log(p).records) == [
        (15000, {"train/CrossEntropyLoss": 1.2345}),
        (30000, {"train/CrossEntropyLoss": 1.25}),
    ]


def test_evaluation_blocks_join_the_step_logged_last_and_a_block_before_any_step_is_left_out(tmp_path):
    p = tmp_path / "train.log"
    pre_train = [f"{PREFIX}Pre-train system metrics", "    System/Peak GPU Memory (MB)=1,234"]
    olmo_eval = [
        f"{PREFIX}[eval_step=10/10]",
        f"{PREFIX}v3-small-c4_en-validation",
        "    eval/v3-small-c4_en-validation/CrossEntropyLoss=10.25",
    ]
    core_eval = [f"{CORE_PREFIX}Finished lm evals in 12.3 seconds. Metrics:", "    c4_en-validation/CE loss=9.75"]
    speed = [f"{CORE_PREFIX}Evaluation speed:", "    c4_en-validation (+variants): 12.3 sec (10 batches)"]
    p.write_text(_log([pre_train, _block(1, 11.0), olmo_eval, _block(2, 10.0), core_eval, speed]))
    log = read_log(p)
    obs = {o.step: o.values for o in build_timeline(log).observations}
    assert obs[1]["eval/v3-small-c4_en-validation/CrossEntropyLoss"] == 10.25
    assert obs[2]["eval/c4_en-validation/CE loss"] == 9.75 and obs[2]["loss"] == 10.0
    assert obs[1]["System/Peak GPU Memory (MB)"] == 31012  # the block's, not the pre-train one's 1,234
    assert any(n.startswith("10 lines that are not step headers") for n in log.notes), log.notes


def test_doctor_names_a_gradient_spike_and_a_nan_loss_in_an_olmo_log(tmp_path, capsys):
    blocks = []
    for step in range(1, 201):
        loss = math.nan if step == 180 else 6.0 * math.exp(-step / 80) + 3.0 + 0.02 * (step % 3)
        blocks.append(_block(step, loss, grad_norm=40.0 if step == 120 else 1.0 + 0.01 * (step % 4), total=200))
    p = tmp_path / "train.log"
    p.write_text(_log(blocks))
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "(olmo, 200 steps" in out and "loss ← train/CrossEntropyLoss" in out
    assert "     120  critical  grad_spike" in out and "     180  critical  non_finite" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{PREFIX}[step=1/10]\n    train/CrossEntropyLoss\n", "line 2"),  # no '='
        (f"{PREFIX}[step=1/10]\n    train/CrossEntropyLoss=\n", "line 2"),
        (f"{PREFIX}[step=1/10]\n    =2.5\n", "line 2"),
        (f"{PREFIX}[step=1/10]\n    a=b=2.5\n", "line 2"),
        ("\n".join(BANNER) + "\n", "no '\\[step=N/MAX\\]' line"),
        (f"{PREFIX}[step=1/10]\n{PREFIX}[step=2/10]\n", "no '\\[step=N/MAX\\]' line"),
    ],
)
def test_a_malformed_line_is_one_error_naming_it(tmp_path, text, message):
    p = tmp_path / "train.log"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="olmo")


_LINE = st.one_of(
    st.text(alphabet="[step=/]0123456789,. \tabc?", max_size=60),
    st.builds(lambda s, t: f"{PREFIX}[step={s}/{t}]", st.integers(-5, 10**7), st.sampled_from(["100", "???", "x"])),
    st.builds(
        lambda n, v: f"    {n}={v}",
        st.sampled_from(["train/CrossEntropyLoss", "optim/total_grad_norm", "x", ""]),
        st.one_of(st.floats(allow_nan=True), st.just("1,234,567"), st.just("1,2"), st.text(max_size=4)),
    ),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "olmo")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        "[step=1/1," * 10_000,  # a header's start again and again, never closed
        "[step=1/1," + "x" * 100_000 + "]",
        "    a" + "=" * 100_000,
        "    " + "a" * 100_000 + "=1",  # a long name: read
        "\n".join(["[step=1/2]"] * 5_000),
    ],
)
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text("\n".join(_block(1, 2.0)) + "\n" + line + "\n")
    detect_format(p)
    try:
        assert len(read_log(p, format="olmo").records) >= 1
    except LogReadError as exc:
        assert "line 8" in str(exc)


def _core_block(step, loss, *, grad_norm=1.0, skipped="0.0", total=60):
    """An OLMo-core ConsoleLoggerCallback block with its default metrics (format_float: 0.0 as "0.0", 1.0 as
    "1.0000"), a SkipStepAdamW optimizer's ``optim/step skipped`` among them."""
    return [
        f"{CORE_PREFIX}[step={step}/{total},epoch=0,eta=1h2m]",
        f"    train/CE loss={_format_float(loss)}",
        f"    train/PPL={_format_float(math.exp(loss))}",
        f"    optim/total grad norm={_format_float(grad_norm)}",
        f"    optim/step skipped={skipped}",
        "    optim/LR (group 0)=3.00E-04",
    ]


def _skipping_run(skipped_at=(40,), value="1.0000"):
    blocks = []
    for step in range(1, 61):
        spike = step in skipped_at
        loss = 9.8 if spike else 4.0 + 0.02 * (step % 3)
        blocks.append(_core_block(step, loss, grad_norm=12.0 if spike else 1.0, skipped=value if spike else "0.0"))
    return "\n".join(line for block in blocks for line in block) + "\n"


def test_olmo_cores_own_skipped_steps_are_the_runs_skips_in_the_doctor_and_the_report(tmp_path, capsys):
    # SkipStepAdamW leaves out a step whose loss or grad norm is over its rolling bound and logs optim/step
    # skipped=1.0000 there: the doctor showed it as a plain signal, the spike as if the update had been applied
    p = tmp_path / "train.log"
    p.write_text(_skipping_run(skipped_at=(40, 50)))
    log = read_log(p)
    assert [(d.step, d.action, d.by) for d in log.decisions] == [(40, "skip", "trainer"), (50, "skip", "trainer")]
    assert "SkipStep" in log.decisions[0].reason
    assert main(["doctor", str(p)]) == 0
    out = capsys.readouterr().out
    assert "skip by the trainer itself at steps 40, 50" in out and "Guard" not in out
    out_html = tmp_path / "r.html"
    assert main(["report", str(p), "-o", str(out_html)]) == 0
    page = out_html.read_text()
    assert "skipped by trainer" in page and "<td>2</td>" in page  # marks on the charts; 2 in the runs table


@pytest.mark.parametrize("value", ["0.0", "nan", "inf", "-1.0000", "2.000", "x", "0.0000"])
def test_a_step_skipped_value_that_is_no_skip_adds_no_decision(tmp_path, capsys, value):
    p = tmp_path / "train.log"
    p.write_text(_skipping_run(value=value))
    assert read_log(p).decisions == []
    assert main(["doctor", str(p)]) == 0
    assert "skip by the trainer" not in capsys.readouterr().out


def test_a_step_skipped_in_an_evaluation_block_is_no_skip(tmp_path):
    p = tmp_path / "train.log"
    text = _skipping_run(skipped_at=())
    p.write_text(text + f"{CORE_PREFIX}Finished lm evals in 12.3 seconds. Metrics:\n    optim/step skipped=1.0000\n")
    assert read_log(p).decisions == []
