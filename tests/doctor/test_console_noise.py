"""Console logs as terminals leave them: every line in ANSI colours (a colouring log handler) and a data-loading
tqdm bar redrawn (``\\r``) between records. Each console reader must read the same records as from the plain log.
Before: nanoGPT's, fairseq's, Composer's, torchtune's and Megatron's readers failed on coloured lines ("no step
column among \\x1b[32miter 1: ...", "line 1 ... is not 'iteration N/ TOTAL ...'"); only torchtitan's and OLMo's
stripped colours themselves."""

import math

import pytest

from keel.doctor import detect_format, read_log
from keel.doctor._text import strip_ansi


def _records(fmt: str, n: int = 30) -> list[list[str]]:
    """Each record of a short run as its tool prints it (one or more lines)."""
    out = []
    for s in range(1, n + 1):
        loss = 2 + 3 * math.exp(-s / 15)
        out.append(
            {
                "nanogpt_stdout": [f"iter {s}: loss {loss:.4f}, time 88.01ms, mfu 4.23%"],
                "fairseq": [
                    f'2023-01-01 10:00:00 | INFO | train_inner | {{"epoch": 1, "loss": "{loss:.3f}", '
                    f'"num_updates": "{s}", "gnorm": "0.6"}}'
                ],
                "torchtitan": [f"[rank0]:[titan] 2025-01-01 10:00:00,000 - root - INFO - step: {s}  loss: {loss:.4f}"],
                "olmo": [
                    f"2024-01-01 10:00:00\tINFO\tolmo.train:816\t[step={s}/{n}]",
                    f"    train/CrossEntropyLoss={loss:.4f}",
                ],
                "composer": [f"[batch={s}/{n}]:", f"\t Train loss/train/total: {loss:.4f}"],
                "step_fields": [f"Step {s} | loss:{loss:.4f} lr:2e-05 grad_norm:tensor(0.6, device='cuda:0')"],
                "megatron": [
                    f" iteration {s:>8}/{n:>8} | learning rate: 3.000E-04 | lm loss: {loss:.6E} | grad norm: 0.600 |"
                ],
                "verl": [f"(TaskRunner pid=7) step:{s} - actor/pg_loss:{loss:.4f} - actor/grad_norm:0.6"],
                "maxtext": [f"completed step: {s}, seconds: 5.667, TFLOP/s/device: 134.924, loss: {loss:.3f}"],
            }[fmt]
        )
    return out


FORMATS = ["nanogpt_stdout", "fairseq", "torchtitan", "olmo", "composer", "step_fields", "megatron", "verl", "maxtext"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_colours_and_progress_bars_change_nothing(tmp_path, fmt):
    records = _records(fmt)
    plain, noisy = tmp_path / "plain.log", tmp_path / "noisy.log"
    plain.write_text("".join(line + "\n" for record in records for line in record))
    bars = (f"\r  {i}%|#    | {i}/30 [00:01<00:30,  1.00it/s]\r" for i in range(len(records)))
    noisy.write_text("".join("".join(f"\x1b[32m{line}\x1b[0m\n" for line in record) + next(bars) for record in records))
    assert detect_format(plain) == fmt
    assert detect_format(noisy) == fmt
    assert list(read_log(noisy).records) == list(read_log(plain).records)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("\x1b[32mgreen\x1b[0m", "green"),
        ("\x1b[2;3m11/03\x1b[0m: x", "11/03: x"),  # nanotron's dim italic
        ("a\x1b[A\x1b[2Kb", "ab"),  # tqdm's cursor up, erase line
        ("\x1b]0;title\x07t", "t"),  # a window title
        ("\x1b[" + "1;" * 5000 + "m", "\x1b[" + "1;" * 5000 + "m"),  # too long for an escape: kept, in linear time
        ("no escape", "no escape"),
    ],
)
def test_strip_ansi(text, plain):
    assert strip_ansi(text) == plain
