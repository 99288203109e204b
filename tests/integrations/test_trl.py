"""keel inside real TRL trainers (trl 1.16): DPOTrainer, GRPOTrainer and RewardTrainer on a tiny Qwen2 built from a
config with a character tokenizer (tests/integrations/_trl_tiny.py; nothing downloaded, CPU)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from keel import KeelWarning
from keel._core import keys
from keel._core.finding import Finding
from keel.detect import default_detectors
from keel.recover import RecoveryConfig
from keel.store import RunReader

pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402

from keel.integrations._trl_statistics import signal_key  # noqa: E402
from keel.integrations.hf import KeelCallback  # noqa: E402
from keel.integrations.trl import META_KEY, _scaled_for_accumulation, guard_trainer  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402

EXAMPLE = Path(__file__).parents[2] / "examples" / "trl_dpo.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: more threads only contend on a shared CPU


def logged(trainer, name: str) -> list[float]:
    """What the Trainer logged under ``name``, step by step (logging_steps=1)."""
    return [h[name] for h in trainer.state.log_history if name in h and "train_runtime" not in h]


def recorded(run_dir: Path, key: str) -> list[float]:
    with RunReader(run_dir) as run:
        return run.signal(key)[1].tolist()


# --- the loss is the trainer's objective, and TRL's statistics are TRL's own -------------------------------------
def test_dpo_keel_records_the_dpo_loss_and_trls_statistics_and_observe_is_bit_identical(tmp_path):
    bare = tiny.dpo_trainer(tmp_path / "bare", steps=3)
    bare.train()
    trainer = tiny.dpo_trainer(tmp_path / "dpo", steps=3)
    guard_trainer(trainer, run_dir=str(tmp_path / "keel"))
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(tiny.params(bare), tiny.params(trainer), strict=True))
    run = tmp_path / "keel"
    assert recorded(run, keys.LOSS) == logged(trainer, "loss")
    assert logged(trainer, "loss")[0] == pytest.approx(math.log(2))  # DPO's loss with a fresh reference
    for trl_name in ("rewards/margins", "rewards/chosen", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert recorded(run, keys.TRL_ALIASES[trl_name]) == logged(trainer, trl_name), trl_name
    assert recorded(run, signal_key("mean_token_accuracy")) == logged(trainer, "mean_token_accuracy")
    # today's KeelCallback records the fused head's token NLL under TRL, ≈ ln(44) for the untrained model
    old = tiny.dpo_trainer(tmp_path / "old", steps=1, callbacks=[KeelCallback(run_dir=str(tmp_path / "old_keel"))])
    old.train()
    assert all(loss > 3.0 for loss in recorded(tmp_path / "old_keel", keys.LOSS))


def test_reward_trainer_loss_and_statistics_reach_keel(tmp_path):
    trainer = tiny.reward_trainer(tmp_path / "rm", steps=3)
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keel saw a loss: no "saw no loss" warning
        trainer.train()
    assert recorded(tmp_path / "keel", keys.LOSS) == logged(trainer, "loss")
    for name in ("accuracy", "margin", "mean_reward"):
        assert recorded(tmp_path / "keel", signal_key(name)) == logged(trainer, name)
    assert callback.guard is not None and callback.guard.global_step == 3


@pytest.mark.slow  # the DPO test above shows the default gap
def test_the_plain_callback_takes_a_reward_models_loss_from_its_backward(tmp_path):
    # a reward model's output has no loss: the plain KeelCallback warned "saw no loss" and watched the gradients only;
    # it now takes the loss the Trainer backpropagates (guard_trainer adds TRL's statistics)
    old = tiny.reward_trainer(tmp_path / "old", steps=2, callbacks=[KeelCallback(run_dir=str(tmp_path / "keel"))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        old.train()
    assert recorded(tmp_path / "keel", keys.LOSS) == pytest.approx(logged(old, "loss"), abs=1e-4)


@pytest.mark.slow  # ~3 s; the default check of the rule is the table below
@pytest.mark.parametrize(
    ("build", "config"),
    [("dpo_trainer", {}), ("grpo_trainer", {"per_device_train_batch_size": 3}), ("reward_trainer", {})],
)
def test_with_gradient_accumulation_keel_records_the_loss_the_trainer_logs(tmp_path, build, config):
    trainer = getattr(tiny, build)(tmp_path / "t", steps=3, gradient_accumulation_steps=2, **config)
    guard_trainer(trainer, run_dir=str(tmp_path / "keel"))
    trainer.train()
    assert recorded(tmp_path / "keel", keys.LOSS) == pytest.approx(logged(trainer, "loss"), rel=1e-6)


class Accumulating:
    """The attributes transformers' Trainer.training_step reads to decide whether to divide compute_loss's loss."""

    def __init__(self, scaled=None, accepts=False, loss_func=None) -> None:
        self.loss_is_scaled_for_ga, self.model_accepts_loss_kwargs, self.compute_loss_func = scaled, accepts, loss_func


@pytest.mark.parametrize(
    ("trainer", "items", "share"),
    [
        (Accumulating(scaled=True), None, True),  # GRPOTrainer: normalised over the whole step, logged summed
        (Accumulating(scaled=False, accepts=True), 8, False),  # DPOTrainer, RewardTrainer: divided, logged as a mean
        (Accumulating(accepts=True), 8, True),  # transformers' own rule when TRL says nothing
        (Accumulating(accepts=True), None, False),
        (Accumulating(loss_func=len), None, True),
    ],
)
def test_a_micro_batch_loss_is_a_share_of_the_step_exactly_when_the_trainer_does_not_divide_it(trainer, items, share):
    assert _scaled_for_accumulation(trainer, items) is share


# --- GRPO: the loss, the statistics, and a rollback drops the buffered completions --------------------------------
class CriticalAt:
    """A detector that finds a critical (non-skippable) problem at the given steps: the ladder rolls back."""

    name = "critical_at"

    def __init__(self, *steps: int) -> None:
        self.steps = set(steps)

    def update(self, obs):
        if obs.step not in self.steps:
            return []
        return [Finding(step=obs.step, kind="divergence", severity="critical", signal=keys.LOSS)]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def count_generations(trainer) -> list[int]:
    calls: list[int] = []
    original = trainer._generate_and_score_completions

    def counted(*args, **kwargs):
        calls.append(trainer.state.global_step)
        return original(*args, **kwargs)

    trainer._generate_and_score_completions = counted
    return calls


def test_grpo_rollback_drops_the_buffered_completions_and_keel_sees_the_grpo_loss(tmp_path):
    # num_iterations=2: TRL generates at optimizer steps 0 and 2 and reuses the buffer at 1 and 3
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=4, num_iterations=2)
    generated = count_generations(trainer)
    recovery = RecoveryConfig(snapshot_every=1, quiet_steps=0)
    callback = guard_trainer(
        trainer, run_dir=str(tmp_path / "keel"), policy="recover", detectors=[CriticalAt(2)], recovery=recovery
    )
    trainer.train()
    assert [(d.step, d.action) for d in callback.guard.decisions] == [(2, "rollback")]
    # step 3 generates afresh from the restored weights (without the drop: [0, 2]); the updates the rollback undid
    # are made again after step 3 (KeelCallback extends max_steps), step 4 generating as TRL's cadence says
    assert generated == [0, 2, 3, 4]
    assert trainer.state.max_steps == 4 + 2 + 1 - callback.guard.decisions[0].restored_step
    with RunReader(tmp_path / "keel") as run:
        meta = run.meta()[META_KEY]
    assert meta["trainer"] == "GRPOTrainer" and meta["buffer_dropped_at"] == [2]
    assert recorded(tmp_path / "keel", keys.LOSS) == logged(trainer, "loss")
    assert any(loss != 0 for loss in logged(trainer, "loss"))
    for trl_name in ("entropy", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"):
        assert recorded(tmp_path / "keel", keys.TRL_ALIASES[trl_name]) == logged(trainer, trl_name), trl_name
    assert keys.RL_KL not in RunReader(tmp_path / "keel").signal_keys()  # β=0: TRL computes no KL


@pytest.mark.slow  # ~3 s: two more GRPO runs; the default test above covers the loss under "recover"
def test_grpo_observe_is_bit_identical_and_todays_callback_records_the_nll_not_the_grpo_loss(tmp_path):
    bare = tiny.grpo_trainer(tmp_path / "bare", steps=3)
    bare.train()
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=3)
    guard_trainer(trainer, run_dir=str(tmp_path / "keel"))
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(tiny.params(bare), tiny.params(trainer), strict=True))
    assert recorded(tmp_path / "keel", keys.LOSS) == logged(trainer, "loss")
    old = tiny.grpo_trainer(tmp_path / "old", steps=3, callbacks=[KeelCallback(run_dir=str(tmp_path / "old_keel"))])
    old.train()
    assert all(loss > 3.0 for loss in recorded(tmp_path / "old_keel", keys.LOSS))  # the NLL, ≈ ln(44)
    assert all(abs(loss) < 1.0 for loss in logged(old, "loss"))


@pytest.mark.slow  # ~3 s: saves the model and GRPO reloads it as the reference
def test_grpo_with_kl_penalty_records_trls_kl(tmp_path):
    folder = tiny.saved_model(tmp_path / "model")
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=3, model=folder, beta=0.1)
    guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="skip")
    trainer.train()
    assert recorded(tmp_path / "keel", keys.LOSS) == logged(trainer, "loss")
    kl = recorded(tmp_path / "keel", keys.RL_KL)
    assert kl == logged(trainer, "kl") and kl[0] == 0.0 and kl[-1] > 0.0  # the policy leaves its reference


# --- detectors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "added"),
    [
        ("dpo_trainer", ["likelihood_displacement"]),
        ("grpo_trainer", ["policy_entropy_collapse", "kl_blowup", "reward_overoptimization", "length_explosion",
                          "clip_saturation", "dead_groups"]),
        ("reward_trainer", []),
    ],
)  # fmt: skip
def test_the_preference_or_rl_detectors_join_the_defaults_unless_detectors_are_given(tmp_path, build, added):
    defaults = [d.name for d in default_detectors()]
    if build == "grpo_trainer":  # GRPO's loss is a surrogate near 0: no loss spike or divergence detector
        defaults = [
            d.name for d in default_detectors() if getattr(getattr(d, "config", None), "signal", None) != keys.LOSS
        ]
        assert "divergence" not in defaults and defaults.count("spike") == 1
    callback = guard_trainer(getattr(tiny, build)(tmp_path / "a", steps=1))
    assert [d.name for d in callback.guard_kwargs.get("detectors", default_detectors())] == defaults + added
    own = guard_trainer(getattr(tiny, build)(tmp_path / "b", steps=1), detectors=[CriticalAt(5)])
    assert [d.name for d in own.guard_kwargs["detectors"]] == ["critical_at"]


# --- bad input ---------------------------------------------------------------------------------------------------
class Bare:
    """Not a TRL trainer."""


@pytest.mark.parametrize("trainer", [None, "DPOTrainer", Bare(), 3.0])
def test_a_trainer_that_is_not_one_of_trls_four_is_refused_when_guarded(trainer):
    with pytest.raises(ValueError, match=r"guard_trainer\(trainer=<\w+>\): allowed: a trl SFTTrainer, DPOTrainer"):
        guard_trainer(trainer)


@pytest.mark.parametrize("metrics", [None, {}, {"train": [1.0]}, [1, 2]])
def test_a_trl_trainer_without_its_statistics_is_refused_when_guarded(tmp_path, metrics):
    trainer = tiny.dpo_trainer(tmp_path, steps=1)
    trainer._metrics = metrics
    with pytest.raises(ValueError, match=r"has no _metrics\['train'\] of TRL statistics"):
        guard_trainer(trainer)


def test_a_trainer_is_guarded_once_and_guard_arguments_are_checked_when_guarded(tmp_path):
    trainer = tiny.reward_trainer(tmp_path, steps=1)
    with pytest.raises(ValueError, match="policy='yolo'; allowed: observe, skip, recover"):
        guard_trainer(trainer, policy="yolo")
    with pytest.raises(ValueError, match="optimizer"):
        guard_trainer(trainer, optimizer=None)
    guard_trainer(trainer)
    with pytest.raises(ValueError, match="has a keel callback already"):
        guard_trainer(trainer)


class BadStatistic(TrainerCallback):
    """Puts a statistic that is not one number in the trainer's _metrics for each step (as a reward function's
    ``log_metric`` with a list would), and takes it out before TRL's own log() averages it."""

    def __init__(self, trainer, value) -> None:
        self.trainer, self.value = trainer, value

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._metrics["train"]["bad"].append(self.value)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._metrics["train"].pop("bad", None)


def test_a_statistic_that_is_not_one_number_is_a_keel_error_and_training_goes_on(tmp_path):
    # one hostile value here; tests/integrations/test_trl_statistics.py has the table
    trainer = tiny.reward_trainer(tmp_path / "rm", steps=3)
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="skip")
    trainer.add_callback(BadStatistic(trainer, torch.ones(2)))
    trainer.train()
    assert callback.guard.global_step == 3
    errors = [f for f in callback.guard.findings if f.kind == "keel_error"]
    assert [(f.step, f.signal) for f in errors] == [(0, "trl:bad")]  # reported once
    assert "TRL statistic 'bad': tensor([1., 1.])" in errors[0].evidence["error"]
    assert "allowed: one real number" in errors[0].evidence["error"]
    assert recorded(tmp_path / "keel", signal_key("accuracy")) == logged(
        trainer, "accuracy"
    )  # the others still recorded


def nan_reward(completions, **kwargs):
    return [math.nan] * len(completions)


@pytest.mark.slow  # ~2 s of GRPO; the default check is test_trl_statistics' NaN case
def test_nan_rewards_are_recorded_as_nan_and_training_goes_on(tmp_path):
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=2, reward=[tiny.digit_reward, nan_reward])
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="skip")
    trainer.train()
    assert callback.guard.global_step == 2 and not callback.guard.decisions
    assert all(math.isnan(v) for v in recorded(tmp_path / "keel", signal_key("rewards/nan_reward/mean")))
    assert all(math.isfinite(v) for v in recorded(tmp_path / "keel", keys.RL_REWARD_MEAN))  # TRL's nansum


# --- examples/trl_dpo.py ------------------------------------------------------------------------------------------
def test_the_trl_dpo_example_skips_the_poisoned_step_and_prints_the_dpo_signals(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trl_dpo_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "5", "--inject-nan", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "step 3: skip" in out and "critical non_finite on loss" in out
    assert "pref/chosen_logp" in out and "pref/margin" in out
    with RunReader(tmp_path) as run:
        assert [(d.step, d.action) for d in run.decisions()] == [(3, "skip")]
        steps, losses = run.signal(keys.LOSS)
        assert steps.tolist() == list(range(5)) and losses[0] == pytest.approx(math.log(2)) and math.isnan(losses[3])
        assert run.meta()[META_KEY]["trainer"] == "DPOTrainer"


class _BreakWeightsAt(TrainerCallback):
    """Writes a NaN into the policy at ``step``; keeps the reference model's parameters at each step's begin and at
    its end before TRL's sync of the reference (this callback is listed before the trainer adds its own)."""

    def __init__(self, step: int) -> None:
        self.step, self.trainer, self.at_begin, self.at_end = step, None, {}, {}

    def _reference(self):
        return [p.detach().clone() for p in self.trainer.ref_model.parameters()]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin[state.global_step] = self._reference()
        if state.global_step == self.step:
            with torch.no_grad():
                list(model.parameters())[-2].view(-1)[0] = math.nan

    def on_step_end(self, args, state, control, **kwargs):
        self.at_end[state.global_step - 1] = self._reference()


def test_tr_dpo_s_reference_model_is_rolled_back_with_the_policy(tmp_path):
    """TR-DPO (``sync_ref_model``) mixes the reference toward the policy every ``ref_model_sync_steps``; a rollback
    restored the policy and left the reference holding the updates it undid (reviewer h26 V11)."""
    breaker = _BreakWeightsAt(5)
    trainer = tiny.dpo_trainer(
        tmp_path / "out",
        steps=8,
        callbacks=[breaker],
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
    )
    breaker.trainer = trainer
    callback = guard_trainer(trainer, policy="recover", recovery=RecoveryConfig(snapshot_every=2))
    trainer.train()
    (rollback,) = [d for d in callback.guard.decisions if d.action == "rollback"]
    expected = breaker.at_begin[rollback.restored_step]
    assert not all(torch.equal(a, b) for a, b in zip(expected, breaker.at_begin[rollback.step], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(expected, breaker.at_end[rollback.step], strict=True))
