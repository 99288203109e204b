"""Logs of tools the doctor did not read before session 16: verl's console (PPO/GRPO and SFT), nanotron, MaxText,
Keras' CSVLogger and a W&B chart's CSV export. The samples (tests/doctor/data/tools, README.md there) are written from
each tool's own output code, not keel's writers. Before: verl and MaxText were "unknown log format", nanotron "no step
column", Keras "no step column among epoch, ...", and the W&B export was read without a loss ("loss is not in this
log": its columns are ``<run> - train/loss``).
"""

import json
import math
import pprint
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.doctor import LogReadError, detect_format, examine_log, map_columns, read_log
from keel.doctor.csv_log import EPOCHS_NOTE, wandb_export
from keel.doctor.verl_log import read_verl_log
from tests.doctor.line_fuzz import assert_a_log_or_one_error

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
    "openrlhf_sft": ("tqdm", {keys.LOSS, keys.GRAD_NORM, keys.LR}, SPIKE_STEP),  # its 2nd epoch continues the count
    "lightning_console": ("tqdm", {keys.LOSS}, 141),  # a real Lightning run; 4 epochs of 40 steps
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


def test_a_wandb_export_of_aggregated_points_keeps_its_bounds_and_says_so(tmp_path):
    # a grouped or bucketed chart: each point the mean of several runs or steps, __MIN/__MAX their range
    p = tmp_path / "chart.csv"
    rows = [f'"{50 * b + 49}","{2.0 + 0.01 * b}","{1.9 + 0.01 * b}","{2.1 + 0.01 * b}"' for b in range(30)]
    p.write_text('"Step","run - train/loss","run - train/loss__MIN","run - train/loss__MAX"\n' + "\n".join(rows) + "\n")
    log = read_log(p)
    assert set(dict(log.records)[49]) == {"train/loss", "train/loss__MIN", "train/loss__MAX"}
    assert any("aggregates" in note and "differ at 30 point" in note for note in log.notes)
    assert not any("aggregates" in note for note in read_log(_sample("wandb_chart_export", "healthy")).notes)


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


@settings(max_examples=40, deadline=None)
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


@pytest.mark.parametrize(("stem", "step", "before"), [("lightning_console", 141, 140), ("openrlhf_sft", 40, 39)])
def test_each_count_gets_its_own_steps_values_whichever_order_the_loop_draws_them(stem, step, before):
    # Lightning updates the bar, then sets the step's postfix; OpenRLHF sets it, then updates: the spike's value must
    # be at its own count in both (read the other way round, it lands one count early or late)
    records = dict(read_log(_sample(stem, "spiky")).records)
    loss = next(name for name in records[step] if "loss" in name)
    assert records[step][loss] > 2.5 * records[before][loss]
    assert records[step + 1][loss] < records[step][loss] / 2


def test_tqdm_redraws_of_one_count_are_one_record_and_a_restart_stays_one(tmp_path):
    p = tmp_path / "train.log"
    bar = "train: {pct}%|##| {n}/4 [00:01<00:03, 1.00it/s, loss={loss}]"
    redraws = [(1, 2.5), (1, 2.5), (2, 2.4), (3, 2.3), (1, 2.6), (2, 2.5)]  # a redraw, then a resume from the start
    p.write_text("\r".join(bar.format(pct=25 * n, n=n, loss=loss) for n, loss in redraws) + "\n")
    log = read_log(p)
    assert log.format == "tqdm"
    assert [(s, v["loss"]) for s, v in log.records] == [(1, 2.5), (2, 2.4), (3, 2.3), (1, 2.6), (2, 2.5)]
    assert examine_log(p).summary["restarts"]  # not an epoch: the bar had not reached its total


def test_tqdm_only_the_training_bar_is_read(tmp_path):
    p = tmp_path / "train.log"
    lines = [f"Train step of epoch 0: 50%|#| {n}/10 [00:0{n}<00:05, 1.00s/it, loss={3 - n / 10}]" for n in (1, 2, 3)]
    lines.insert(2, "Eval stage of steps 2: 100%|#| 5/5 [00:01<00:00, eval_loss=9.9]")
    p.write_text("\n".join(lines) + "\n")
    log = read_log(p)
    assert [s for s, _ in log.records] == [1, 2, 3] and all("eval_loss" not in v for _, v in log.records)
    assert any("1 redraws of other progress bars" in note for note in log.notes)


@pytest.mark.parametrize(
    "segment",
    [
        "x" * 100_000 + "1/2 [a=1]",
        "[" * 50_000 + "]",
        "1/2 [" + "=" * 50_000 + "]",
        "9" * 50_000 + "it [a=1]",
        "1/2 [=1]",
    ],
    ids=["long-head", "brackets", "equals", "digits", "no-name"],
)
def test_hostile_tqdm_segments_give_records_or_one_clear_error(tmp_path, segment):
    p = tmp_path / "train.log"
    p.write_text("train: 1/2 [00:01<00:01, loss=2.0]\r" + segment + "\n")
    log = read_log(p, "tqdm")
    assert all(isinstance(v, float) for _, values in log.records for v in values.values())


def test_a_bracketed_text_log_of_an_unknown_tool_is_not_called_bad_json(tmp_path):
    p = tmp_path / "train.log"  # DeepSpeed's engine lines: no loss, and no reader for them
    p.write_text(
        "[2024-05-01 12:00:01,000] [INFO] [logging.py:96:log_dist] [Rank 0] step=10, skipped=0, lr=[0.0003], "
        "mom=[(0.9, 0.999)]\n"
    )
    with pytest.raises(LogReadError, match="unknown log format"):
        read_log(p)
    json_array = tmp_path / "log.json"
    json_array.write_text('[{"step": 1, "loss": 2.0}]\n')
    assert detect_format(json_array) == "jsonl"


def test_a_maxtext_metrics_file_is_read_under_keel_keys(tmp_path):
    # MaxText's metric_logger.write_metrics_locally: json.dumps of {each scalar: float, "step": float(step), "run_name"}
    p = tmp_path / "metrics.txt"
    rows = []
    for step in range(40):
        loss = 11.0 - 0.1 * step + (20.0 if step == 30 else 0.0)
        scalars = {
            "learning/loss": loss,
            "learning/grad_norm": 1.0,
            "learning/raw_grad_norm": 5.0 + (200.0 if step == 30 else 0.0),
            "learning/current_learning_rate": 1e-4,
            "perf/step_time_seconds": 5.6,
        }
        rows.append(json.dumps({**scalars, "step": float(step), "run_name": "demo"}))
    p.write_text("\n".join(rows) + "\n")
    result = examine_log(p)
    signals = result.summary["signals"]
    assert signals[keys.LOSS]["column"] == "learning/loss"
    assert signals[keys.LR]["column"] == "learning/current_learning_rate"
    assert signals[keys.GRAD_NORM]["column"] == "learning/raw_grad_norm"  # before clipping, as the Guard reads it
    assert keys.STEP_TIME in signals
    found = {(f.kind, f.step) for f in result.at_least("critical")}
    assert {("loss_spike", 30), ("grad_spike", 30)} <= found


def test_openrlhf_names_map_to_keel_keys():
    # openrlhf/trainer/ray/ppo_actor.py: status {"policy_loss", "actor_lr", ...} logged as train/<name> to W&B and
    # TensorBoard (ppo_utils/loggers.py), and as act_loss / act_lr in the progress bar
    for names in (["train/policy_loss", "train/actor_lr"], ["act_loss", "act_lr"], ["policy_loss", "actor_lr"]):
        assert set(map_columns(names).values()) == {keys.LOSS, keys.LR}, names


def test_a_resumed_lightning_run_in_the_same_file_restarts_at_its_epochs_steps(tmp_path):
    # epochs 0 and 1 of 4 steps, epoch 2 killed at count 2; the run resumed from the end of epoch 0 (tee -a)
    bar = "Epoch {e}: {pct}%|#| {n}/4 [00:01<00:01, 1.00it/s, v_num=0, train_loss={loss}]"
    drawn = [(0, n) for n in (1, 2, 3, 4)] + [(1, n) for n in (1, 2, 3, 4)] + [(2, 1), (2, 2)]
    drawn += [(1, n) for n in (1, 2, 3, 4)] + [(2, n) for n in (1, 2, 3, 4)]
    p = tmp_path / "train.log"
    p.write_text("\r".join(bar.format(e=e, pct=25 * n, n=n, loss=2 - 0.01 * i) for i, (e, n) in enumerate(drawn)))
    steps = [s for s, _ in read_log(p).records]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 11, 12]
    assert examine_log(p).summary["restarts"]["count"] == 1


# --- generated lines: a log or one clear error, for each new line reader ---------------------------------------

FUZZ = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True), st.just("nan"), st.just("1E+999"), st.just("np.float64(0.5)"), st.just("1.5K")
)
LINES = {
    "verl": st.one_of(
        st.text(alphabet="step:- /_.0123456789anpflot()", max_size=50),
        st.builds(
            lambda s, v, g: f"step:{s} - actor/pg_loss:{v} - actor/grad_norm:{g}",
            st.integers(-5, 10**7),
            NUMBERS,
            NUMBERS,
        ),
    ),
    "maxtext": st.one_of(
        st.text(alphabet="completed step:, 0123456789.los", max_size=50),
        st.builds(lambda s, v: f"completed step: {s}, seconds: 5.6, loss: {v}", st.integers(0, 10**7), NUMBERS),
    ),
    "tqdm": st.one_of(
        st.text(alphabet="Epoch 0123456789%|#/[]<>:,=. itslo\r", max_size=60),
        st.builds(
            lambda e, n, t, v: f"Epoch {e}: {n}%|#| {n}/{t} [00:01<00:02, 1.00it/s, loss={v}]",
            st.integers(0, 3),
            st.integers(0, 50),
            st.integers(0, 50),
            NUMBERS,
        ),
    ),
    "megatron": st.builds(  # nanotron's shape
        lambda s, t, v, g: f"iteration: {s} / {t} | lm_loss: {v} | grad_norm: {g}",
        st.integers(0, 10**7),
        st.integers(0, 10**7),
        NUMBERS,
        NUMBERS,
    ),
}


@pytest.mark.parametrize("fmt", sorted(LINES))
def test_any_generated_lines_give_a_log_or_one_error(tmp_path_factory, fmt):
    @FUZZ
    @given(lines=st.lists(LINES[fmt], max_size=10))
    def check(lines):
        assert_a_log_or_one_error(tmp_path_factory.mktemp(fmt), lines, fmt)

    check()
