"""The HF Trainer's console output (``{'loss': ..., 'epoch': ...}`` dicts, tqdm's bar redrawn around them with
``\\r``) read by ``keel doctor`` with the Guard's detectors, and hostile variants."""

import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cli import main
from keel.doctor import build_timeline, detect_format, read_log
from keel.doctor.log import LogReadError
from tests.doctor.line_fuzz import assert_a_log_or_one_error

BANNER = ["[transformers] `loss_type=None` was set in the config but it is unrecognized."]
CLEAR = "\r" + " " * 46 + "\r"  # tqdm clears its bar before a write


def _bar(n, total):
    return f"\r{100 * n // total:3d}%|##        | {n}/{total} [00:01<00:09, 10.00it/s]"


def _dict(step, loss, *, grad_norm=1.0, total=200, v5=True):
    """The Trainer's log dict as transformers 5 prints it (floats as 4-significant-digit strings) or 4.x (floats)."""
    values = {"loss": loss, "grad_norm": grad_norm, "learning_rate": 5e-05, "epoch": step / total}
    return str({k: f"{v:.4g}" for k, v in values.items()} if v5 else values)


def _with_bar(step, text, total=200):
    """A training dict as a terminal capture holds it: the bar (one step behind), cleared, the dict, the bar redrawn."""
    return _bar(step - 1, total) + CLEAR + text + "\n" + _bar(step, total)


def test_dicts_with_the_bar_redrawn_after_them_are_read_at_the_bars_count(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(
        "\n".join(BANNER) + "\n" + _with_bar(10, _dict(10, 2.5, grad_norm=3.5)) + _with_bar(20, _dict(20, 2.25))
    )
    assert detect_format(p) == "hf_console"
    log = read_log(p)
    first, second = build_timeline(log).observations
    assert (first.step, second.step) == (10, 20)
    assert first.values["loss"] == 2.5 and first.values["grad/norm"] == 3.5 and first.values["lr"] == 5e-05
    assert any("progress bar's count" in n for n in log.notes), log.notes


def test_without_a_bar_the_training_dicts_are_numbered_in_order_and_a_note_says_so(tmp_path, capsys):
    p = tmp_path / "train.log"
    p.write_text("\n".join([*BANNER, _dict(10, 2.5, v5=False), _dict(20, 2.25, v5=False)]) + "\n")
    assert detect_format(p) == "hf_console"
    log = read_log(p)
    assert [s for s, _ in log.records] == [1, 2]
    assert any("numbered 1..N in order" in n for n in log.notes), log.notes


def test_a_dict_glued_to_the_bar_before_it_is_read(tmp_path):
    # stdout flushed right after stderr's bar, no carriage return between (a real buffered Trainer run does this)
    p = tmp_path / "train.log"
    p.write_text(
        _bar(6, 12) + _dict(3, 3.901, total=12) + "\n" + _dict(6, 3.916, total=12) + "\n" + _bar(12, 12) + "\n"
    )
    log = read_log(p)
    assert [(s, v["loss"]) for s, v in log.records] == [(1, 3.901), (2, 3.916)]
    assert any("not the logged steps" in n for n in log.notes), log.notes


def test_a_bar_missing_after_one_dict_numbers_them_all(tmp_path):
    p = tmp_path / "train.log"
    p.write_text(_with_bar(10, _dict(10, 2.5)) + "\n" + _dict(20, 2.25) + "\n" + _dict(30, 2.0) + _bar(30, 200) + "\n")
    assert [s for s, _ in read_log(p).records] == [1, 2, 3]


def test_unevenly_spaced_bar_counts_are_not_steps_and_a_launchers_prefix_is_skipped(tmp_path):
    # as a multi-node srun log quotes it: "0: " before each dict, and the bar's counts after them 17 and 18 apart
    lines = []
    for count, loss in ((18, 3.0288), (35, 2.8485), (53, 2.7659), (71, 2.7257)):
        lines += [
            "0: " + _dict(count, loss, total=1136, v5=False),
            f"  2%|▏         | {count}/1136 [00:08<08:31,  2.19it/s]",
        ]
    p = tmp_path / "train.log"
    p.write_text("1: [INFO|trainer.py:2136] >>   Total optimization steps = 1,136\n" + "\n".join(lines) + "\n")
    assert detect_format(p) == "hf_console"
    log = read_log(p)
    assert [s for s, _ in log.records] == [1, 2, 3, 4] and dict(log.records)[1]["loss"] == 3.0288
    assert any("not evenly spaced" in n for n in log.notes), log.notes


def test_a_first_step_and_then_every_logging_steps_are_the_bars_counts(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("".join(_with_bar(step, _dict(step, 2.5)) for step in (1, 10, 20, 30)) + "\n")
    assert [s for s, _ in read_log(p).records] == [1, 10, 20, 30]


def test_evaluations_join_the_training_entry_before_them_and_the_summary_is_left_out(tmp_path):
    evaluation = (
        "\x1b[A{'eval_loss': '2.4', 'eval_runtime': '0.011', 'eval_samples_per_second': '727.6', 'epoch': '0.1'}"
    )
    summary = "{'train_runtime': '12.3', 'train_samples_per_second': '266.3', 'train_loss': '2.3', 'epoch': '0.2'}"
    p = tmp_path / "train.log"
    p.write_text(
        _with_bar(20, _dict(20, 2.5))
        + "\n"
        + CLEAR
        + evaluation
        + "\n"
        + _with_bar(40, _dict(40, 2.25))
        + CLEAR
        + summary
        + "\n"
    )
    log = read_log(p)
    obs = {o.step: o.values for o in build_timeline(log).observations}
    assert sorted(obs) == [20, 40]
    assert obs[20]["val/loss"] == 2.4 and obs[20]["loss"] == 2.5 and "val/loss" not in obs[40]
    assert any(n.startswith("1 end-of-training summary") for n in log.notes), log.notes


def test_an_evaluation_with_a_callbacks_own_value_is_still_an_evaluation(tmp_path):
    # lines as a Kaggle write-up quotes its Trainer's console (a callback adds 'elapsed' to every log)
    lines = [
        "{'loss': 2.2699, 'grad_norm': 7.9375, 'learning_rate': 4.155e-05, 'elapsed': 3891.08, 'epoch': 3.7546}",
        "{'eval_loss': 2.1393, 'eval_runtime': 42.3699, 'elapsed': 4185.54, 'epoch': 4.0}",
        "{'loss': 2.3233, 'grad_norm': 8.5625, 'learning_rate': 4.027e-05, 'elapsed': 4279.60, 'epoch': 4.096}",
    ]
    p = tmp_path / "train.log"
    p.write_text("\n".join(lines) + "\n")
    log = read_log(p)
    assert [s for s, _ in log.records] == [1, 2]  # one entry per training dict: no restart
    records = dict(log.records)
    assert records[1]["eval_loss"] == 2.1393 and records[1]["elapsed"] == 3891.08 and records[2]["loss"] == 2.3233


def test_nan_inf_and_tensor_reprs_of_older_versions_are_read(tmp_path):
    p = tmp_path / "train.log"
    lines = [
        "{'loss': nan, 'grad_norm': inf, 'learning_rate': 5e-05, 'epoch': 0.01}",
        "{'loss': 2.5, 'grad_norm': tensor(1.25, device='cuda:0'), 'learning_rate': 5e-05, 'epoch': 0.02}",
        "{'loss': '-inf', 'grad_norm': -inf, 'learning_rate': '5e-05', 'epoch': '0.03', 'step': 3}",
        "{'loss': 2.0, 'note': 'lr: inf, then nan}', 'epoch': 0.04}",  # text that looks like the reprs is left as is
    ]
    p.write_text("\n".join(lines) + "\n")
    records = dict(read_log(p).records)
    assert math.isnan(records[1]["loss"]) and records[1]["grad_norm"] == math.inf
    assert records[2]["grad_norm"] == 1.25
    assert records[3]["loss"] == -math.inf and records[3]["logged_step"] == 3
    assert records[4]["loss"] == 2.0


def test_doctor_names_a_gradient_spike_and_a_nan_loss_in_the_trainers_console(tmp_path, capsys):
    parts = []
    for step in range(1, 201):
        loss = math.nan if step == 180 else 6.0 * math.exp(-step / 80) + 3.0 + 0.02 * (step % 3)
        parts.append(_with_bar(step, _dict(step, loss, grad_norm=40.0 if step == 120 else 1.0 + 0.01 * (step % 4))))
    p = tmp_path / "train.log"
    p.write_text("\n".join(BANNER) + "\n" + "".join(parts) + "\n")
    assert main(["doctor", str(p), "--fail-on", "critical"]) == 1
    out = capsys.readouterr().out
    assert "(hf_console, 200 steps" in out
    assert "     120  critical  grad_spike" in out and "     180  critical  non_finite" in out


TRAINER_SCRIPT = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
args = TrainingArguments(
    output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=12, logging_steps=3, eval_strategy="steps",
    eval_steps=6, report_to=[], save_strategy="no", disable_tqdm=sys.argv[2] == "1", use_cpu=True,
)
Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8]).train()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("disable_tqdm", "unbuffered", "steps"),
    [("0", "1", [3, 6, 9, 12]), ("0", "", [1, 2, 3, 4]), ("1", "", [1, 2, 3, 4])],
)
def test_a_real_trainers_console_output_is_read(tmp_path, disable_tqdm, unbuffered, steps):
    """A tiny Trainer run's stdout and stderr in one file (``2>&1``): with tqdm's bar and unbuffered stdout the steps
    are the logged ones; with stdout buffered (dicts glued to bars, out of order) or no bar the entries are numbered.
    Every dict is read either way; evaluations join the entries of steps 6 and 12."""
    script, log_path = tmp_path / "train.py", tmp_path / "train.log"
    script.write_text(TRAINER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"OMP_NUM_THREADS": "1"}
    if unbuffered:  # as a terminal, or python -u; else stdout is block-buffered, as with "> train.log 2>&1"
        env["PYTHONUNBUFFERED"] = unbuffered
    with log_path.open("w") as out:
        cmd = [sys.executable, str(script), str(tmp_path / "out"), disable_tqdm]
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=True, timeout=300)
    assert detect_format(log_path) == "hf_console"
    log = read_log(log_path)
    assert [s for s, _ in log.records] == steps
    with_eval = [s for s, values in log.records if "eval_loss" in values]
    assert with_eval == [steps[1], steps[3]] and all(math.isfinite(v["loss"]) for _, v in log.records)
    assert any(n.startswith("1 end-of-training summary") for n in log.notes), log.notes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{'loss': 2.5, 'epoch': 0.1\n", "line 1"),  # cut off
        ("{'loss': 2.5, 'epoch': __import__('os')}\n", "line 1"),  # never evaluated
        ("{'loss'}\n", "line 1"),  # a set
        ("x\n{'loss': [1, 2}\n", "line 2"),
        ("{'loss': 1" + "0" * 5000 + ", 'epoch': 1}\n", "line 1"),  # an int too long to convert
        ("{'model': 'gpt2', 'lr': 0.1}\n", "no Trainer log dict"),
    ],
)
def test_a_malformed_dict_is_one_error_naming_it(tmp_path, text, message):
    p = tmp_path / "train.log"
    p.write_text(text)
    with pytest.raises(LogReadError, match=message):
        read_log(p, format="hf_console")


_LINE = st.one_of(
    st.text(alphabet="{}':, 0123456789.-naifepochls\r|/[]", max_size=60),
    st.builds(
        lambda v, g, e: "{" + f"'loss': {v}, 'grad_norm': {g}, 'epoch': {e}" + "}",
        st.one_of(st.floats(allow_nan=True), st.just("'nan'"), st.just("nan"), st.just("1e999")),
        st.one_of(st.floats(allow_nan=True), st.just("tensor(1.5)"), st.just("tensor(x, device='cpu')")),
        st.one_of(st.floats(0, 10), st.just("'0.5'"), st.just("[1]")),
    ),
    st.builds(lambda n, t: f"\r {n}/{t} [00:00<00:01]", st.integers(0, 10**6), st.integers(0, 10**6)),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_any_text_gives_a_log_or_one_log_read_error(tmp_path, lines):
    assert_a_log_or_one_error(tmp_path, lines, "hf_console")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "line",
    [
        "{'" + "a" * 100_000,
        "{'loss': " + "[" * 50_000 + "]" * 50_000 + "}",  # nested too deeply for the parser
        "{'loss': 1, 'epoch': 1" + ", 'x': nan" * 10_000 + "}",  # many values: read
        "\r" * 100_000,
        "{'" + "'epoch': " * 10_000,
        "tensor(" * 15_000 + "}",
    ],
)
def test_long_lines_are_read_past_or_refused_not_a_hang(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text(_dict(1, 2.0) + "\n" + line + "\n")
    detect_format(p)
    try:
        assert len(read_log(p, format="hf_console").records) >= 1
    except LogReadError as exc:
        assert "line 2" in str(exc)


def test_a_tensor_value_in_scientific_notation_is_read(tmp_path):
    # torch prints a scalar tensor >= 1e8 or < 1e-4 as tensor(1.2346e+09, ...): an exploding grad norm made the
    # whole log unreadable (reviewer W14)
    from keel.doctor import read_log

    p = tmp_path / "train.log"
    p.write_text(
        "{'loss': 2.5, 'grad_norm': tensor(1.2346e+09, device='cuda:0'), 'learning_rate': 5e-05, 'epoch': 0.1}\n"
        "{'loss': 2.4, 'grad_norm': tensor(3.2000e-05, device='cuda:0'), 'learning_rate': 5e-05, 'epoch': 0.2}\n"
    )
    assert [values["grad_norm"] for _, values in read_log(p).records] == [1.2346e09, 3.2e-05]


def test_dicts_that_log_their_own_step_keep_it(tmp_path):
    # a callback or a custom Trainer that logs 'step': its NaN at step 350 was reported at entry 7 (reviewer W10)
    from keel.doctor import read_log

    p = tmp_path / "train.log"
    p.write_text(
        "".join(f"{{'loss': {2.0 - 0.01 * i}, 'step': {50 * (i + 1)}, 'epoch': {i / 10}}}\n" for i in range(8))
    )
    log = read_log(p)
    assert [s for s, _ in log.records] == [50, 100, 150, 200, 250, 300, 350, 400]
    assert all("step" not in values for _, values in log.records)
    assert any("own step" in note for note in log.notes)


def _killed_and_resumed_log(counts_before, counts_after, total=24):
    """A Trainer run killed after its logs at ``counts_before``, resumed from a checkpoint (``resume_from_checkpoint``)
    with its console appended to the same file (``tee -a``): the bar starts again at the checkpoint's step. The shape
    of /tmp/h24C/hf_resumed_real.log, a real tiny Trainer run killed at step 17 and resumed from step 12."""
    killed = "".join(_with_bar(n, _dict(n, 3.9, total=total), total) for n in counts_before)
    traceback = "\nTraceback (most recent call last):\n    raise KeyboardInterrupt\nKeyboardInterrupt\n"
    resumed = "".join(_with_bar(n, _dict(n, 3.8, total=total), total) for n in counts_after)
    return "\n".join(BANNER) + "\n" + killed + traceback + "\n".join(BANNER) + "\n" + resumed + "\n"


def test_a_log_appended_across_a_crash_keeps_every_step_and_the_doctor_says_it_restarted(tmp_path, capsys):
    # a killed run resumed from its checkpoint, both appended to one file: the bar's count goes back once; every
    # dict was numbered 1..9 and no restart was said (reviewer W8)
    p = tmp_path / "train.log"
    p.write_text(_killed_and_resumed_log((3, 6, 9, 12, 15), (15, 18, 21, 24)))
    log = read_log(p)
    assert [s for s, _ in log.records] == [3, 6, 9, 12, 15, 15, 18, 21, 24]
    assert main(["doctor", str(p), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["restarts"]["count"] == 1 and summary["restarts"]["listed"] == [{"step": 15, "after_step": 15}]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((10, 20, 30), (5, 12)),  # uneven after the restart
        ((10, 20, 30), (20, 25, 30)),  # another spacing after it
        ((10, 20, 35), (20, 30)),  # uneven before it
        ((30, 20, 10), ()),  # going back at every dict: no stretch is a run
    ],
)
def test_counts_that_go_back_but_are_not_evenly_spaced_are_still_numbered(tmp_path, before, after):
    p = tmp_path / "train.log"
    p.write_text(_killed_and_resumed_log(before, after, total=200))
    assert [s for s, _ in read_log(p).records] == list(range(1, len(before) + len(after) + 1))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bars=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=10))
def test_any_bar_counts_after_the_dicts_give_a_log_with_every_dict(tmp_path, bars):
    # counts that go back, repeat, exceed their total or are 0: the steps are the counts or 1..N, never fewer entries
    p = tmp_path / "train.log"
    p.write_text("".join(_with_bar(n + 1, _dict(n + 1, 2.0 + i), total + 1) for i, (n, total) in enumerate(bars)))
    assert len(read_log(p, format="hf_console").records) == len(bars)


def test_deepspeeds_overflow_lines_in_a_trainers_console_get_a_note_of_their_own(tmp_path):
    # the shape of transformers' DeepSpeed docs (fp16 under the Trainer's DeepSpeed integration): the scaler's lines
    # between the bar's redraws; they were counted with every other line left out
    overflow = " [deepscale] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: {a}, reducing to {b}\n"
    p = tmp_path / "train.log"
    p.write_text(
        overflow.format(a=262144, b=262144)
        + _bar(1, 200)
        + "\n"
        + overflow.format(a=262144, b="131072.0")
        + _with_bar(10, _dict(10, 2.5))
        + _with_bar(20, _dict(20, 2.25))
    )
    log = read_log(p)
    assert log.format == "hf_console" and [s for s, _ in log.records] == [10, 20]
    note = "2 loss-scaler overflow line(s) (fp16 steps DeepSpeed skipped; its step count goes on): the loss scale went "
    assert note + "from 262144 to 131072.0 left out" in log.notes
    assert not any(n.startswith("2 lines that are not Trainer log dicts") for n in log.notes)
