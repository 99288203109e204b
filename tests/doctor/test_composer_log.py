"""MosaicML Composer's console log (``[epoch=E][batch=B/N]:`` blocks of tab-indented ``Train name: value`` lines,
``[Eval batch=N/N] Eval on eval data:`` blocks) read by ``keel doctor`` with the Guard's detectors, and hostile
variants. It was misread as CSV before ("no step column among 2024-09-30 02:05:36, 662: rank0...")."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, examine_log, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

BANNER = [
    "2024-09-30 02:05:36,662: rank0[73][MainThread]: INFO: composer.trainer.trainer: Using precision AMP_FP16",
    "*" * 30,
    "Config:",
    "composer_version: 0.21.3",
    "num_gpus_per_node: 8",
    "*" * 30,
]


def _loss(batch: int) -> float:
    return 3.0 + 8.0 * math.exp(-batch / 30) + 0.05 * math.sin(batch * 1.9)


def _block(header: str, batch: int | None, loss: float, prefix: str = "") -> list[str]:
    """A train block as ConsoleLogger prints it: each metric on its own line, tab and space first, 4 decimals."""
    lines = [f"{prefix}{header}:"]
    if batch is not None:
        lines.append(f"{prefix}\t Train time/batch: {batch - 1}")
    lines += [
        f"{prefix}\t Train loss/train/total: {loss:.4f}",
        f"{prefix}\t Train metrics/train/LanguageCrossEntropy: {loss:.4f}",
        f"{prefix}\t Train l2_norm/grad/global: 1.2345",
        f"{prefix}\t Train lr-DecoupledAdamW/group0: 0.0006",
        f"{prefix}\t Train expert_selection/ffn_layer: <wandb.sdk.data_types.image.Image object at 0x711e4ce7f800>",
    ]
    return lines


def _eval_block(loss: float) -> list[str]:
    return [
        "[Eval batch=1/10] Eval on eval data",
        "[Eval batch=5/10] Eval on eval data",
        "[Eval batch=10/10] Eval on eval data:",
        f"\t Eval metrics/eval/LanguageCrossEntropy: {loss:.4f}",
    ]


def _epoch_log(batches: int, per_epoch: int, loss=_loss) -> str:
    lines = list(BANNER)
    for b in range(1, batches + 1):
        epoch, in_epoch = (b - 1) // per_epoch + 1, (b - 1) % per_epoch + 1
        lines += _block(f"[epoch={epoch}][batch={in_epoch}/{per_epoch}]", b, loss(b))
        if b % 50 == 0:
            lines += _eval_block(loss(b) + 0.1)
    return "\n".join(lines) + "\n"


def test_epoch_blocks_are_numbered_by_time_batch_across_epochs_and_metrics_mapped(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_epoch_log(120, per_epoch=40))
    assert detect_format(p) == "composer"
    log = read_log(p)
    obs = {o.step: o.values for o in build_timeline(log).observations}
    assert sorted(obs) == list(range(1, 121))  # batch 5 of epoch 2 is step 45, not 5
    assert obs[45]["loss"] == round(_loss(45), 4)
    assert obs[45]["grad/norm"] == 1.2345 and obs[45]["lr"] == 0.0006
    assert obs[50]["eval/metrics/eval/LanguageCrossEntropy"] == round(_loss(50) + 0.1, 4)
    assert not any(k.startswith("expert_selection") for k in obs[45])
    assert "120 metric lines whose value is not a number left out" in log.notes


def test_batch_headers_give_the_step_and_token_headers_are_numbered_in_order(tmp_path):
    batch_log = tmp_path / "batch.log"
    batch_log.write_text("\n".join(_block("[batch=7/100]", None, 2.0) + _block("[batch=8/100]", None, 1.9)) + "\n")
    assert [s for s, _ in read_log(batch_log).records] == [7, 8]
    token_log = tmp_path / "token.log"
    token_log.write_text(
        "\n".join(_block("[token=4096/1000000]", None, 2.0) + _block("[token=8192/1000000]", None, 1.9))
    )
    log = read_log(token_log)
    assert [s for s, _ in log.records] == [1, 2]
    assert any("numbered in order" in n for n in log.notes), log.notes


def test_srun_rank_prefixes_are_skipped(tmp_path):
    p = tmp_path / "slurm-1.out"
    p.write_text("\n".join(_block("[batch=1/300000000]", 1, 12.0, prefix="0: ")) + "\n")
    assert detect_format(p) == "composer"
    ((step, values),) = read_log(p).records
    assert step == 1 and values["loss/train/total"] == 12.0


def test_a_spike_is_found_at_its_step_and_a_healthy_run_is_quiet(tmp_path, capsys):
    (tmp_path / "healthy.log").write_text(_epoch_log(300, per_epoch=100))
    (tmp_path / "spiked.log").write_text(_epoch_log(300, per_epoch=100, loss=lambda b: 14.0 if b == 250 else _loss(b)))
    assert not [f for f in examine_log(tmp_path / "healthy.log").findings if f.severity != "info"]
    assert [f.step for f in examine_log(tmp_path / "spiked.log").findings if f.kind == "loss_spike"] == [250]
    assert main(["doctor", "--fail-on", "warning", str(tmp_path / "spiked.log")]) == 1
    assert "loss_spike" in capsys.readouterr().out


def test_a_log_without_a_train_block_is_one_error(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("\n".join([*BANNER, "[batch=1/10]:", "[Eval batch=1/10] Eval on eval data"]) + "\n")
    with pytest.raises(LogReadError, match=r"no '\[batch=N/TOTAL\]:' block"):
        read_log(p, format="composer")


_LINE = st.one_of(
    st.text(alphabet="[]batch=/:\t TrainEvl0123456789.-nf", max_size=60),
    st.builds(lambda b: f"[batch={b}/100]:", st.one_of(st.integers(-5, 10**7), st.just("1e30"))),
    st.builds(
        lambda n, v: f"\t Train {n}: {v}",
        st.sampled_from(["loss/train/total", "time/batch", "l2_norm/grad/global", ":", ""]),
        st.one_of(st.floats(allow_nan=True), st.just("1E+999"), st.just("-1"), st.just("99999999999999999999")),
    ),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "composer")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        "\t Train loss/train/total: " + "9" * 100_000,
        "\t Train " + "a" * 100_000 + ": 1.0",
        "[batch=2/100]:" + " " * 100_000,
        "[epoch=1]" * 12_000 + "[batch=2/100]:",
    ],
)
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text("\n".join(_block("[batch=1/100]", 1, 2.0)) + "\n" + line + "\n")
    assert detect_format(p) == "composer"
    assert len(read_log(p).records) >= 1
