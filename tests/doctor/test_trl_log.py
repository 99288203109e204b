"""`keel doctor` on TRL logs: a DPOTrainer's or GRPOTrainer's ``trainer_state.json`` and JSON lines name their
statistics TRL's way (``rewards/margins``, ``frac_reward_zero_std``); keel reads them under its own keys
(`keys.TRL_ALIASES`), where the preference and RL detectors look for them."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.doctor import examine_log, map_columns

DPO_HISTORY = [
    {"loss": 0.6931, "grad_norm": 0.55, "learning_rate": 0.05, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
     "rewards/accuracies": 0.0, "rewards/margins": 0.0, "logps/chosen": -15.0, "logps/rejected": -15.17,
     "entropy": 3.78, "logits/chosen": 0.003, "num_tokens": 32.0, "epoch": 0.125, "step": 1},
    {"loss": 0.7039, "grad_norm": 0.52, "learning_rate": 0.033, "rewards/chosen": 0.0018, "rewards/rejected": 0.023,
     "rewards/accuracies": 0.0, "rewards/margins": -0.0213, "logps/chosen": -11.5, "logps/rejected": -11.27,
     "entropy": 3.777, "logits/chosen": 0.267, "num_tokens": 60.0, "epoch": 0.25, "step": 2},
    {"loss": 0.6927, "grad_norm": 0.21, "learning_rate": 0.017, "rewards/chosen": -0.044, "rewards/rejected": -0.045,
     "rewards/accuracies": 1.0, "rewards/margins": 0.0009, "logps/chosen": -13.73, "logps/rejected": -13.69,
     "entropy": 3.775, "logits/chosen": 0.235, "num_tokens": 90.0, "epoch": 0.375, "step": 3},
    {"train_runtime": 0.41, "train_samples_per_second": 14.5, "train_loss": 0.6966, "epoch": 0.375, "step": 3},
]  # fmt: skip
DPO_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "entropy"]  # fmt: skip
GRPO_NAMES = ["reward", "reward_std", "frac_reward_zero_std", "entropy", "kl", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "completions/mean_length", "completions/max_length",
              "completions/clipped_ratio"]  # fmt: skip


def write_state(path, history):
    path.write_text(json.dumps({"global_step": 3, "max_steps": 3, "logging_steps": 1, "log_history": history}))
    return path


def signals(result) -> dict[str, str]:
    """keel key → the log column it was read from."""
    return {key: info["column"] for key, info in result.summary["signals"].items()}


def test_a_dpo_trainer_state_is_read_under_keels_preference_keys(tmp_path):
    result = examine_log(write_state(tmp_path / "trainer_state.json", DPO_HISTORY))
    read = signals(result)
    assert {name: keys.TRL_ALIASES[name] for name in DPO_NAMES}.items() <= {v: k for k, v in read.items()}.items()
    assert read[keys.LOSS] == "loss" and read["logits/chosen"] == "logits/chosen"  # unmapped names stay
    assert result.summary["signals"][keys.PREF_MARGIN]["observations"] == 3
    assert result.findings == []


def test_grpo_json_lines_with_a_train_prefix_are_read_under_keels_rl_keys(tmp_path):
    lines = [
        {"train/global_step": s, "train/loss": -0.01 * s} | {f"train/{n}": 0.1 * s for n in GRPO_NAMES}
        for s in range(1, 6)
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    read = signals(examine_log(path))
    assert {keys.TRL_ALIASES[n]: f"train/{n}" for n in GRPO_NAMES}.items() <= read.items()


def test_a_log_without_trl_statistics_keeps_its_generic_names(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss,entropy,reward,kl\n" + "".join(f"{s},2.0,3.0,0.5,0.1\n" for s in range(10)))
    read = signals(examine_log(path))
    assert {"entropy", "reward", "kl"} <= read.keys() and keys.RL_ENTROPY not in read


def test_keels_own_key_wins_over_the_trl_name_of_the_same_signal():
    mapping = map_columns(["step", "pref/margin", "rewards/margins", "rewards/chosen"])
    assert mapping == {
        "step": "step",
        "pref/margin": keys.PREF_MARGIN,
        "rewards/margins": "rewards/margins",
        "rewards/chosen": keys.PREF_CHOSEN_REWARD,
    }


# --- hostile TRL logs: missing statistics, NaN, text where numbers belong, null --------------------------------------
def test_a_hostile_trl_trainer_state_is_read_without_a_crash(tmp_path):
    history = [
        {"loss": 0.69, "rewards/margins": 0.0, "logps/chosen": -15.0, "step": 1},
        {"loss": 0.70, "rewards/margins": "NaN", "logps/chosen": "high", "step": 2},  # numeric string / text
        {"loss": 0.70, "rewards/margins": None, "step": 3},  # null: not logged; logps/chosen missing
        {"loss": float("nan"), "rewards/margins": float("nan"), "logps/chosen": -16.0, "step": 4},
        {"loss": 0.68, "rewards/margins": 0.3, "logps/chosen": [1, 2], "entropy": {"mean": 3.7}, "step": 5},
    ]
    result = examine_log(write_state(tmp_path / "trainer_state.json", history))
    margin = result.summary["signals"][keys.PREF_MARGIN]
    assert margin["column"] == "rewards/margins" and margin["observations"] == 4 and margin["non_finite"] == 2
    assert result.summary["signals"][keys.PREF_CHOSEN_LOGP]["observations"] == 2  # "high", missing, list: not values
    assert "entropy/mean" in result.summary["signals"]  # a nested object is flattened, not a TRL statistic
    assert [(f.step, f.kind) for f in result.findings] == [(4, "non_finite")]  # the NaN loss


@pytest.mark.parametrize("bad", [{"log_history": "rewards/margins"}, {"log_history": [{"rewards/margins": 1.0}]}])
def test_a_trl_trainer_state_without_steps_is_one_clear_error(tmp_path, bad):
    from keel.doctor import LogReadError

    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(LogReadError, match="trainer_state.json: no"):
        examine_log(path)


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(keys.TRL_ALIASES)), min_size=1, unique=True),
    prefix=st.sampled_from(["", "train/", "train_", "Train/"]),
    others=st.lists(st.sampled_from(["loss", "grad_norm", "epoch", "tflops", "logits/chosen"]), unique=True),
)
def test_each_trl_name_maps_to_its_key_once_a_trl_statistic_marks_the_log(names, prefix, others):
    columns = [prefix + n for n in names] + others
    mapping = map_columns(columns)
    marked = any("/" in n for n in names)
    for name in names:
        assert mapping[prefix + name] == (keys.TRL_ALIASES[name] if marked else prefix + name)
    assert len(set(mapping.values())) == len(mapping)  # no two columns share a key


def test_nan_in_a_trl_statistic_is_counted_as_non_finite(tmp_path):
    history = [{"rewards/margins": math.nan if s == 2 else 0.1 * s, "loss": 0.7, "step": s} for s in range(1, 5)]
    result = examine_log(write_state(tmp_path / "trainer_state.json", history))
    assert result.summary["signals"][keys.PREF_MARGIN]["non_finite"] == 1


# --- logs written by real tiny TRL trainers -----------------------------------------------------------------------
def trained_state(tmp_path, build, names, **config):
    """Train a tiny TRL trainer, save its trainer_state.json, and return (log_history, keel key → values read)."""
    pytest.importorskip("trl")
    from keel.doctor.formats import read_log
    from keel.doctor.timeline import build_timeline
    from tests.integrations import _trl_tiny as tiny

    trainer = getattr(tiny, build)(tmp_path / "out", steps=3, **config)
    trainer.train()
    path = tmp_path / "trainer_state.json"
    trainer.state.save_to_json(str(path))
    timeline = build_timeline(read_log(path))
    history = [h for h in trainer.state.log_history if "train_runtime" not in h]
    assert timeline.steps.tolist() == [h["step"] for h in history]
    for name in names:
        key = keys.TRL_ALIASES[name]
        assert timeline.columns[key] == name
        assert timeline.signals[key].values.tolist() == [h[name] for h in history], name
    return examine_log(path)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_dpo_trainer_state_is_read_under_keels_preference_keys(tmp_path):
    result = trained_state(tmp_path, "dpo_trainer", DPO_NAMES)
    assert result.summary["format"] == "hf_trainer_state" and result.findings == []


@pytest.mark.slow  # ~2 s of GRPO generation; the JSON-lines test above reads the same names by default
@pytest.mark.usefixtures("one_torch_thread")
def test_a_real_grpo_trainer_state_is_read_under_keels_rl_keys(tmp_path):
    names = [n for n in GRPO_NAMES if n != "kl"]  # β=0: TRL logs no KL
    trained_state(tmp_path, "grpo_trainer", names)


# --- the preference and RL detectors run over TRL logs -------------------------------------------------------------
def test_likelihood_displacement_is_found_in_a_dpo_trainer_state(tmp_path):
    noise = [0.3 * math.sin(1.7 * s) for s in range(80)]
    history = [
        {"loss": 0.69 - 0.002 * s, "logps/chosen": -15.0 - 0.1 * s + noise[s], "logps/rejected": -15.0 - 0.2 * s,
         "rewards/margins": 0.01 * s + 0.1 * noise[s], "rewards/chosen": -0.01 * s, "step": s + 1}
        for s in range(80)
    ]  # fmt: skip
    result = examine_log(write_state(tmp_path / "trainer_state.json", history))
    assert "likelihood_displacement" in [d["name"] for d in result.summary["detectors"]]
    found = [f for f in result.findings if f.kind == "likelihood_displacement"]
    assert found and found[0].signal == keys.PREF_CHOSEN_REWARD  # the quiet log-ratio first


def test_entropy_collapse_is_found_in_grpo_json_lines(tmp_path):
    lines = [
        {"step": s, "loss": 0.01, "entropy": 3.8 * math.exp(-s / 40) + 0.01 * math.sin(s), "reward": 0.5,
         "completions/mean_length": 8.0, "frac_reward_zero_std": 0.2}
        for s in range(1, 201)
    ]  # fmt: skip
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    result = examine_log(path)
    assert [f.signal for f in result.findings if f.kind == "policy_entropy_collapse"][:1] == [keys.RL_ENTROPY]


def test_a_log_without_preference_or_rl_signals_runs_the_default_detectors_only(tmp_path):
    from keel.detect import default_detectors

    path = tmp_path / "log.csv"
    path.write_text("step,loss,entropy\n" + "".join(f"{s},2.0,3.0\n" for s in range(10)))
    names = [d["name"] for d in examine_log(path).summary["detectors"]]
    assert names == [d.name for d in default_detectors()]
