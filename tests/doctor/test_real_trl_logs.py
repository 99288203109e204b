"""`keel doctor` on real TRL logs from public repositories (`data/trl_real/README.md`: source, commit, extract).

What each log shows, and so what doctor must say:

- ``dpo_soup_75steps.json`` (DPOTrainer, fp16): ``grad_norm`` is NaN at steps 1, 2, 18 and 74, the loss stays finite
  there and after, and the learning rate does not advance past those steps — fp16's loss scaler skipped them, as
  designed. A healthy run otherwise: margins 0 → 4.0, accuracy 0.5 → 1.0, chosen reward around 0 (no displacement).
- ``grpo_chaos_economy_*.json`` (GRPOTrainer, ``max_completion_length=512``): the mean completion length climbs to
  the limit and the truncated share to 100 % (from step 115 / 65 on), the loss flat at 0 — a true length explosion.
- ``orpo_rlhf_recsys_336steps.json`` (ORPOTrainer): a quiet run; nothing to warn of.
- ``grpo_trl_script_digits_60steps.json`` (TRL's own ``trl/scripts/grpo.py``, 8-token limit): every completion is cut
  at 8 tokens from step 1, the reward (share of digits) rises 0.125 → 1.0, its maximum, by step 22 and every group is
  uniform from there (``frac_reward_zero_std`` 1.0): dead groups because the task is solved, not truncation
  starvation (trl#5697: truncated answers all scoring 0) — raising ``max_completion_length`` would not help.
- ``dpo_trl_script_lr0.3_60steps.json`` (TRL's own ``trl/scripts/dpo.py``, LR 0.3): the chosen log-probability falls
  −13 → −250 while the margin rises 0 → 12–16 — likelihood displacement, which ``guard_trainer`` warned of live.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel._core import keys
from keel.detect.non_finite import NonFiniteConfig
from keel.doctor import examine_log

DATA = Path(__file__).parent / "data" / "trl_real"
DPO = DATA / "dpo_soup_75steps.json"
GRPO_200 = DATA / "grpo_chaos_economy_200steps.json"
GRPO_250 = DATA / "grpo_chaos_economy_250steps.json"
ORPO = DATA / "orpo_rlhf_recsys_336steps.json"
DPO_HOT = DATA / "dpo_trl_script_lr0.3_60steps.json"
GRPO_SOLVED = DATA / "grpo_trl_script_digits_60steps.json"
MAX_OVERFLOWS = NonFiniteConfig().max_overflows
# The statistics TRL 0.14 and 0.15's GRPOTrainer logs (0.16 adds `clip_ratio`): no `completions/…` names yet.
TRL_014_GRPO = ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "completion_length", "kl", "step")


def history(path: Path) -> list[dict]:
    return json.loads(path.read_text())["log_history"]


def write_history(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps({"log_history": records}))
    return path


def warned(result) -> list[tuple[int, str, str]]:
    return [(f.step, f.kind, f.severity) for f in result.at_least("warning")]


# --- the real logs, as a new user runs `keel doctor` on them ----------------------------------------------------
def test_a_real_fp16_dpo_log_raises_no_alarm_for_the_steps_its_loss_scaler_skipped():
    result = examine_log(DPO)
    assert warned(result) == []
    skipped = [(f.step, f.kind, f.severity) for f in result.findings if f.signal == keys.GRAD_NORM]
    assert skipped == [(s, "loss_scale_overflow", "info") for s in (1, 2, 18, 74)]
    assert {keys.PREF_CHOSEN_REWARD, keys.PREF_MARGIN, keys.RL_ENTROPY} <= result.summary["signals"].keys()


@pytest.mark.parametrize(("path", "step"), [(GRPO_200, 120), (GRPO_250, 75)])
def test_real_grpo_logs_whose_completions_reach_the_limit_warn_of_length_explosion(path, step):
    result = examine_log(path)
    assert warned(result) == [(step, "length_explosion", "warning")]
    assert result.findings[0].evidence["limit"] == 512  # TRL's completions/max_length, the run's max_completion_length


def test_a_real_orpo_log_is_read_under_keels_preference_keys_without_an_alarm():
    result = examine_log(ORPO)
    assert result.summary["signals"][keys.PREF_MARGIN]["observations"] == 33
    assert result.findings == []


def test_doctor_runs_on_a_dpo_log_the_detectors_guard_trainer_ran_live():
    """DPOTrainer logs its token entropy as ``entropy`` (keel's ``rl/entropy``): that alone must not bring the GRPO/PPO
    preset, whose advice (clip-higher, dynamic sampling) does not apply to DPO, onto a DPO log."""
    from keel.detect import default_detectors, preference_detectors

    result = examine_log(DPO_HOT)
    assert [d["name"] for d in result.summary["detectors"]] == [
        d.name for d in (*default_detectors(), *preference_detectors())
    ]
    assert warned(result) == [(24, "likelihood_displacement", "warning")]


def test_groups_uniform_at_a_risen_reward_are_dead_groups_not_truncation_starvation():
    result = examine_log(GRPO_SOLVED)
    dead = [(f.kind, f.severity) for f in result.findings if f.signal == keys.RL_ZERO_STD_GROUPS]
    assert dead == [("dead_groups", "warning"), ("dead_groups", "critical")]
    assert "truncation_starvation" not in result.summary["by_kind"]


def test_truncated_groups_stuck_at_the_starting_reward_are_truncation_starvation(tmp_path):
    """The same real log with the reward held at its first value (trl#5697: every truncated answer scores 0)."""
    records = history(GRPO_SOLVED)
    for r in records:
        if "reward" in r:
            r["reward"] = records[0]["reward"]
    result = examine_log(write_history(tmp_path / "trainer_state.json", records))
    dead = [(f.kind, f.severity) for f in result.findings if f.signal == keys.RL_ZERO_STD_GROUPS]
    assert dead == [("truncation_starvation", "warning"), ("truncation_starvation", "critical")]


def test_a_trl_014_grpo_log_is_read_under_keels_rl_keys(tmp_path):
    """TRL 0.14–0.16 named the mean completion length ``completion_length`` and had no ``x/y`` statistic of keel's
    list; the real 200-step log, cut to the columns TRL 0.14 logs, must still reach the policy detectors."""
    records = [{k: r[k] for k in TRL_014_GRPO if k in r} | _per_function_rewards(r) for r in history(GRPO_200)]
    result = examine_log(write_history(tmp_path / "trainer_state.json", records))
    read = {key: info["column"] for key, info in result.summary["signals"].items()}
    assert {keys.RL_REWARD_MEAN: "reward", keys.RL_REWARD_STD: "reward_std", keys.RL_KL: "kl"}.items() <= read.items()
    assert read[keys.RL_LENGTH_MEAN] == "completion_length"
    assert "kl_blowup" in [d["name"] for d in result.summary["detectors"]]


def _per_function_rewards(record: dict) -> dict:
    """TRL 0.14's per-function reward names: ``rewards/<function>`` (later ``rewards/<function>/mean``)."""
    return {k.removesuffix("/mean"): v for k, v in record.items() if k.startswith("rewards/") and k.endswith("/mean")}


def test_a_log_with_both_length_names_reads_the_current_one(tmp_path):
    result = examine_log(GRPO_200)
    assert result.summary["signals"][keys.RL_LENGTH_MEAN]["column"] == "completions/mean_length"
    assert "completion_length" in result.summary["signals"]  # the older name keeps its own: nothing is dropped


# --- what must stay critical: a NaN gradient that was applied, an endless overflow, one with nothing after it ---
def test_a_nan_gradient_followed_by_a_nan_loss_stays_critical(tmp_path):
    records = history(DPO)
    for r in records[18:]:  # steps 19…75: the update at 18 was applied and poisoned the weights
        r["loss"] = math.nan
    result = examine_log(write_history(tmp_path / "trainer_state.json", records))
    assert (18, "non_finite", "critical") in warned(result)


def test_as_many_overflows_in_a_row_as_the_scaler_allows_are_critical_from_the_last(tmp_path):
    records = history(DPO)
    for r in records[29 : 29 + MAX_OVERFLOWS]:  # steps 30…49
        r["grad_norm"] = math.nan
    result = examine_log(write_history(tmp_path / "trainer_state.json", records))
    assert warned(result) == [(29 + MAX_OVERFLOWS, "non_finite", "critical")]


def test_a_nan_gradient_on_the_last_logged_step_stays_critical(tmp_path):
    records = history(DPO)
    records[-1]["grad_norm"] = math.inf
    result = examine_log(write_history(tmp_path / "trainer_state.json", records))
    assert (75, "non_finite", "critical") in warned(result)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([1.0, math.nan, math.inf]), st.sampled_from([0.5, 0.5, math.nan])),
        min_size=1,
        max_size=40,
    )
)
def test_a_non_finite_gradient_is_info_exactly_when_the_log_shows_its_step_was_skipped(tmp_path_factory, rows):
    """Reference: a non-finite grad norm with a finite loss is a skipped overflow (info) when the next logged loss is
    finite and fewer than ``max_overflows`` such steps came in a row; otherwise critical."""
    records = [{"step": i + 1, "loss": loss, "grad_norm": g} for i, (g, loss) in enumerate(rows)]
    path = write_history(tmp_path_factory.mktemp("log") / "trainer_state.json", records)
    got = {f.step: f.severity for f in examine_log(path).findings if f.signal == keys.GRAD_NORM}
    want, run = {}, 0
    for i, (g, loss) in enumerate(rows):
        grad_only = not math.isfinite(g) and math.isfinite(loss)
        run = run + 1 if grad_only else 0
        if grad_only:
            after_finite = i + 1 < len(rows) and math.isfinite(rows[i + 1][1])
            want[i + 1] = "info" if after_finite and run < MAX_OVERFLOWS else "critical"
    assert got == want


@settings(max_examples=100, deadline=None)
@given(
    names=st.sets(
        st.sampled_from(["reward", "reward_std", "completion_length", "kl", "entropy", "completions/mean_length"])
    ),
    prefix=st.sampled_from(["", "train/", "train_"]),
)
def test_the_mean_length_is_read_from_the_current_trl_name_else_the_014_one_in_a_trl_log(names, prefix):
    from keel.doctor import map_columns

    mapping = map_columns([prefix + n for n in sorted(names)] + ["loss"])
    marked = "completions/mean_length" in names or {"reward", "reward_std", "completion_length"} <= names
    length_from = [n for n, key in mapping.items() if key == keys.RL_LENGTH_MEAN]
    if not marked:
        assert length_from == [] and keys.RL_REWARD_MEAN not in mapping.values()
    elif "completions/mean_length" in names:
        assert length_from == [prefix + "completions/mean_length"]
    else:
        assert length_from == [prefix + "completion_length"]
    assert len(set(mapping.values())) == len(mapping)  # no two columns share a key
