"""Logs of tools the doctor did not read before session 16: verl's console (PPO/GRPO and SFT), nanotron, MaxText,
Keras' CSVLogger and a W&B chart's CSV export. The samples (tests/doctor/data/tools, README.md there) are written from
each tool's own output code, not keel's writers. Before: verl and MaxText were "unknown log format", nanotron "no step
column", Keras "no step column among epoch, ...", and the W&B export was read without a loss ("loss is not in this
log": its columns are ``<run> - train/loss``).
"""

import math
import pprint
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.doctor import LogReadError, detect_format, examine_log, read_log
from keel.doctor.csv_log import EPOCHS_NOTE, wandb_export
from keel.doctor.verl_log import read_verl_log

TOOLS = Path(__file__).parent / "data" / "tools"
SPIKE_STEP = 40

# file stem → (reader, the signals the doctor must find, the step of the spike in the spiky log)
SAMPLES = {
    "verl_ppo": ("verl", {keys.LOSS, keys.GRAD_NORM, keys.LR, keys.RL_ENTROPY, keys.RL_REWARD_MEAN}, SPIKE_STEP),
    "verl_sft": ("verl", {keys.LOSS, keys.LR}, SPIKE_STEP),
    "nanotron": ("megatron", {keys.LOSS, keys.GRAD_NORM, keys.LR}, SPIKE_STEP),
    "maxtext": ("maxtext", {keys.LOSS, keys.STEP_TIME}, SPIKE_STEP - 1),  # MaxText counts from step 0
    "keras_csvlogger": ("csv", {keys.LOSS, keys.LR, keys.VAL_LOSS}, SPIKE_STEP - 1),  # epochs from 0
    "wandb_chart_export": ("csv", {keys.LOSS}, SPIKE_STEP),
}


def _sample(stem, kind):
    (path,) = TOOLS.glob(f"{stem}_{kind}.*")
    return path


@pytest.mark.parametrize("stem", sorted(SAMPLES))
def test_a_healthy_log_is_read_whole_and_raises_nothing(stem):
    reader, signals, _ = SAMPLES[stem]
    path = _sample(stem, "healthy")
    assert detect_format(path) == reader
    result = examine_log(path)
    assert signals <= set(result.summary["signals"]), result.summary["signals"]
    assert result.summary["observations"] >= 50
    assert result.at_least("warning") == []


@pytest.mark.parametrize("stem", sorted(SAMPLES))
def test_a_spiky_log_gets_a_critical_spike_at_its_step(stem):
    _, signals, spike = SAMPLES[stem]
    found = {(f.kind, f.step) for f in examine_log(_sample(stem, "spiky")).at_least("critical")}
    assert ("loss_spike", spike) in found
    if keys.GRAD_NORM in signals:
        assert ("grad_spike", spike) in found


def test_verl_values_are_read_as_printed():
    log = read_log(_sample("verl_ppo", "healthy"))
    records = dict(log.records)
    assert records[0] == {"val-core/openai/gsm8k/reward/mean@1": 0.12}  # the validation before training
    first = records[1]
    assert first["actor/lr"] == 1e-06 and first["training/global_step"] == 1.0
    assert isinstance(first["actor/pg_loss"], float)  # np.float64(...) unwrapped
    assert any("not step lines" in note for note in log.notes)  # Ray's start-up line and the config check
    sft = dict(read_log(_sample("verl_sft", "healthy")).records)
    assert set(sft[10]) == {"train/loss", "train/lr"} and sft[10]["train/lr"] == pytest.approx(3e-4)  # ×1e-3


def test_verl_rl_metrics_run_the_policy_detectors():
    result = examine_log(_sample("verl_ppo", "healthy"))
    mapped = result.summary["signals"]
    assert {keys.RL_ENTROPY, keys.RL_KL, keys.RL_LENGTH_MEAN, keys.RL_TRUNCATED} <= set(mapped)


def test_nanotron_suffixed_values_are_numbers():
    records = dict(read_log(_sample("nanotron", "spiky")).records)
    assert records[SPIKE_STEP]["grad_norm"] == 1500.0  # written "1.5K" by human_format
    assert records[1]["consumed_tokens"] == pytest.approx(262000.0)  # "262K"


def test_keras_epochs_are_the_steps_and_a_note_says_so(tmp_path):
    log = read_log(_sample("keras_csvlogger", "healthy"))
    assert log.step_column == "epoch" and EPOCHS_NOTE in log.notes
    both = tmp_path / "metrics.csv"  # Lightning's CSVLogger: a step column beside epoch is the step
    both.write_text("epoch,step,train_loss\n0,9,2.0\n0,19,1.9\n")
    log = read_log(both)
    assert log.step_column == "step" and [s for s, _ in log.records] == [9, 19] and EPOCHS_NOTE not in log.notes


def test_a_wandb_export_of_several_runs_keeps_their_names(tmp_path):
    p = tmp_path / "chart.csv"
    p.write_text(
        '"Step","a - loss","a - loss__MIN","a - loss__MAX","b - loss","b - loss__MIN","b - loss__MAX"\n'
        '"1","2.0","2.0","2.0","3.0","3.0","3.0"\n'
    )
    log = read_log(p)
    assert dict(log.records)[1] == {"a - loss": 2.0, "b - loss": 3.0}
    assert any("2 runs" in note for note in log.notes)


@pytest.mark.parametrize(
    "header",
    [
        ["step", "loss", "loss__MIN"],  # a bound without a "<run> - " series
        ["step", "a - loss", "b - x__MAX"],  # a bound whose series is missing
        ["step", "a - loss"],  # no bounds: an ordinary CSV whose column has a dash
        ["Step", "a - loss__MIN"],  # only bounds
        ["x", "", "a - loss", "a - loss__MAX"],  # a nameless column
    ],
)
def test_headers_that_are_not_a_wandb_export(header):
    assert not wandb_export(header)


VERL_LINES = [
    "step:1 - ",  # no field at all
    "step:1 - :3 - loss",  # empty name, no colon
    "step:1 - loss:np.float64(",  # a numpy repr cut off
    "step:1 - loss:np.float64(1.0",
    "step:1 - loss:True - acc:None",  # bools and text values
    "step:99999999999999999999 - loss:1",  # a step beyond int64: not a step line
    "step:1 - loss:" + "9" * 5000,  # a huge number
    "step:1 - " + "a:" * 20000,  # a long line of colons
    "\x1b[" * 10000 + "step:1 - loss:1.0",
    "step:1 - step:5 - loss:1.0",  # a metric named like the step keeps the line's step
]


@pytest.mark.parametrize("line", VERL_LINES, ids=range(len(VERL_LINES)))
def test_hostile_verl_lines_give_records_or_one_clear_error(tmp_path, line):
    p = tmp_path / "train.log"
    p.write_text(f"step:0 - loss:1.0\n{line}\n")
    log = read_verl_log(p)
    for step, values in log.records:
        assert isinstance(step, int) and all(isinstance(v, float) for v in values.values())
    assert [step for step, _ in log.records][-1] in (0, 1)


def test_a_verl_log_without_step_lines_is_one_clear_error(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("(TaskRunner pid=1) Training from scratch\n")
    with pytest.raises(LogReadError, match="step:N - name:value"):
        read_verl_log(p)


NAMES = st.from_regex(r"[a-z_][a-z_/@.0-9-]{0,30}", fullmatch=True).filter(lambda n: " - " not in n)
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(np.float64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(np.float32),
)


@settings(max_examples=60, deadline=None)
@given(metrics=st.dictionaries(NAMES, VALUES, min_size=1, max_size=8), step=st.integers(0, 10**6))
def test_what_verl_prints_is_read_back(tmp_path_factory, metrics, step):
    # verl's concat_dict_to_str, as its source writes it: "step:N" and "name:pprint.pformat(value)" joined by " - "
    line = " - ".join([f"step:{step}", *(f"{name}:{pprint.pformat(value)}" for name, value in metrics.items())])
    p = tmp_path_factory.mktemp("verl") / "train.log"
    p.write_text(f"\x1b[36m(TaskRunner pid=2397)\x1b[0m {line}\n")
    ((read_step, values),) = list(read_verl_log(p).records)
    assert read_step == step
    expected = {name: float(value) for name, value in metrics.items() if name not in ("train/lr(1e-3)",)}
    for name, value in expected.items():
        got = values[name]
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-6), (name, line)


def test_verl_detection_is_not_fooled_by_prose():
    from keel.doctor.verl_log import looks_like_verl

    assert not looks_like_verl("In this step: - we check the config\n")
    assert not looks_like_verl("step:1/100 train_loss:2.0\n")  # modded-nanogpt's shape
    assert re.search("step:1 -", "x step:1 - a:1") and looks_like_verl("x step:1 - a:1\n")
