"""A log read while its run is still writing it (or killed mid-line, or copied mid-write) ends in a cut line: the
line readers leave that last, unterminated line out with a note instead of refusing the whole log. A malformed
line anywhere else, or a malformed last line that ends in a newline, stays one error naming it."""

import pytest

from keel.cli import main
from keel.doctor import read_log
from keel.doctor.log import LogReadError

MEGATRON = (
    " iteration {s}/  159576 | consumed samples:       216960 | elapsed time per iteration (ms): 3050.2 | "
    "learning rate: 5.998E-05 | global batch size:   128 | lm loss: 2.32{s}E+00 | loss scale: 1.0 | "
    "grad norm: 0.{s} | number of skipped iterations:   0 | number of nan iterations:   0 |"
)
# Each format: its lines for steps 1, 2, 3 in the shapes real logs print (torchtitan's from a public H200 debug run,
# OLMo's from an OLMo-1B run log, the Trainer's from a Kaggle write-up: h23-F findings), and the format's name.
SHAPES = {
    "torchtitan": lambda s: (
        f"[rank0]:[titan] 2025-11-25 19:45:0{s},441 - root - INFO - step:  {s}  loss:  8.02{s}  grad_norm:  1.46{s}"
        "  memory:  1.21GiB(0.86%)  tps: 5,756  tflops: 0.41  mfu: 0.04%"
    ),
    "fairseq": lambda s: (
        f'2021-03-01 10:00:0{s} | INFO | train_inner | {{"epoch": 1, "update": 0.{s}, "loss": "9.{s}", '
        f'"num_updates": "{s}00", "lr": "1.25e-05", "gnorm": "4.{s}", "loss_scale": "64"}}'
    ),
    "megatron": lambda s: MEGATRON.format(s=s),
    "nanogpt_stdout": lambda s: f"iter {s}: loss 4.26{s}, time 88.01ms, mfu 4.23%",
    "modded_nanogpt": lambda s: f"step:{s}/3 train_loss:10.8{s} train_time:{s}00ms step_avg:nanms",
    "karpathy_text": lambda s: f"s:{s} trl:5.3{s}",
    "olmo": lambda s: (
        f"[2024-04-18 14:24:1{s}] INFO     [olmo.train:729, rank=0] [step={s}/739328]\n"
        f"    train/CrossEntropyLoss=11.3{s}\n    optim/total_grad_norm=1.{s}"
    ),
    "hf_console": lambda s: (
        f"{{'loss': 6.512{s}, 'grad_norm': 53.{s}, 'learning_rate': 1.14e-05, 'elapsed': 328.66, 'epoch': 0.{s}}}"
    ),
}


def _log(format, cut):
    """Steps 1 and 2 whole, then step 3's text cut ``cut`` characters from its end (at least 3 left; no newline)."""
    last = SHAPES[format](3)
    return "\n".join(SHAPES[format](s) for s in (1, 2)) + "\n" + last[: max(3, len(last) - cut)]


@pytest.mark.parametrize("format", list(SHAPES))
@pytest.mark.parametrize("cut", [1, 5, 20])
def test_a_cut_last_line_is_left_out_with_a_note(tmp_path, format, cut):
    p = tmp_path / "train.log"
    p.write_text(_log(format, cut))
    log = read_log(p, format=format)
    steps = [step for step, _ in log.records]
    assert steps[:2] == [1, 2] or steps[:2] == [100, 200], steps  # fairseq counts updates
    if len(steps) == 2:
        assert any("cut off" in note for note in log.notes), log.notes


@pytest.mark.parametrize("format", ["torchtitan", "fairseq", "megatron", "hf_console"])
def test_the_doctor_reads_a_log_whose_run_is_writing_its_last_line(tmp_path, capsys, format):
    # the whole log was one "line 3 (...) is not ..." error before
    p = tmp_path / "train.log"
    p.write_text(_log(format, 20))
    assert main(["doctor", str(p), "--format", format]) == 0
    assert "cut off" in capsys.readouterr().out


@pytest.mark.parametrize("format", list(SHAPES))
def test_a_malformed_line_that_is_not_the_cut_end_is_still_one_error(tmp_path, format):
    second = SHAPES[format](2)
    lines = [SHAPES[format](1), second[: max(3, len(second) - 20)], SHAPES[format](3)]
    p = tmp_path / "train.log"
    for text in ("\n".join(lines) + "\n", "\n".join(lines[:2]) + "\n"):  # in the middle; last, with its newline
        p.write_text(text)
        with pytest.raises(LogReadError, match=r"line \d"):
            read_log(p, format=format)
