"""GRPO under ``policy="recover"`` with an update that leaves an Inf weight (helper H's H7): TRL generates the next
completions from the updated weights before keel's next step, and its sampling raised ("probability tensor contains
either inf, nan or element < 0"), ending the run with keel's rollback never reached — TRL's own grpo.py, an Inf
written into an MLP weight at step 10: "run failed ... after 11 steps". The adapter now checks the weights after each
applied update and, when they are not finite, lets the next step train on the buffered completions instead of
generating: keel then finds the weights, rolls back, and TRL generates from the restored ones. Since 580316f the Guard
itself checks the weights after each applied update under ``recover`` and rolls back in the same step, before TRL
generates; the adapter's check remains for where the Guard's is off (an enabled GradScaler, ``sync="deferred"``)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback

from keel import RecoveryConfig

pytest.importorskip("trl")
from keel.integrations.trl import guard_trainer  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402
from tests.integrations.test_trl import count_generations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BROKEN_AT = 2


class InfWeightAt(TrainerCallback):
    """An Inf written into an MLP weight just before the update of ``step``: the update leaves it there, as an
    overflowing one would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")


def test_an_update_that_leaves_an_inf_weight_is_rolled_back_before_grpo_generates_from_it(tmp_path, caplog):
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=5, callbacks=[InfWeightAt(BROKEN_AT)])
    generated = count_generations(trainer)
    recovery = RecoveryConfig(snapshot_every=1, quiet_steps=0)
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "keel"), policy="recover", recovery=recovery)
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer.train()  # raised RuntimeError in torch.multinomial at step 3's generation
    [rollback] = callback.guard.decisions
    assert (rollback.step, rollback.action) == (BROKEN_AT, "rollback") and rollback.restored_step <= BROKEN_AT
    assert "model.layers.0.mlp.up_proj.weight" in rollback.reason or any(
        "up_proj" in str(f.evidence) or "up_proj" in f.cause for f in rollback.findings
    )
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert BROKEN_AT + 1 in generated  # from the restored weights: the Guard rolled back in the update's own step
    # the adapter's own check (and its "trains on the buffered completions" line) is not needed then
    assert not [r for r in caplog.records if "non-finite weights" in r.getMessage()]


def test_where_the_guard_does_not_check_the_weights_the_adapter_holds_the_generation_and_keel_rolls_back(
    tmp_path, caplog
):
    # sync="deferred": the Guard reads nothing before the next update, so the adapter's own check is what stops TRL
    # from sampling from the broken weights
    trainer = tiny.grpo_trainer(tmp_path / "grpo", steps=5, callbacks=[InfWeightAt(BROKEN_AT)])
    generated = count_generations(trainer)
    recovery = RecoveryConfig(snapshot_every=1, quiet_steps=0)
    callback = guard_trainer(
        trainer, run_dir=str(tmp_path / "keel"), policy="recover", sync="deferred", recovery=recovery
    )
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer.train()
    [rollback] = callback.guard.decisions
    assert (rollback.step, rollback.action) == (BROKEN_AT + 1, "rollback") and rollback.restored_step <= BROKEN_AT
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert BROKEN_AT + 1 not in generated  # held: that step trained on the buffered completions
    said = [r.getMessage() for r in caplog.records if "non-finite weights" in r.getMessage()]
    assert said == [
        f"step {BROKEN_AT}: the update left non-finite weights (model.layers.0.mlp.up_proj.weight); TRL's next "
        "generation would sample from them and raise, so the next step trains on the completions already buffered, "
        "and keel rolls back"
    ]


def test_the_weights_are_not_read_after_updates_unless_recover_can_act_on_them(tmp_path):
    for policy in ("observe", "skip"):
        callback = guard_trainer(tiny.grpo_trainer(tmp_path / policy, steps=1), policy=policy)
        assert callback._weights is None


@pytest.mark.slow  # ~1.7 s; the GRPO test above covers the mechanism in the default suite
def test_rloo_built_like_grpo_is_rolled_back_the_same_way(tmp_path):
    from tests.integrations.test_trl_rloo import rloo_trainer

    trainer = rloo_trainer(tmp_path / "rloo")
    trainer.add_callback(InfWeightAt(1))
    recovery = RecoveryConfig(snapshot_every=1, quiet_steps=0)
    callback = guard_trainer(trainer, policy="recover", recovery=recovery)
    trainer.train()  # without the check, step 2 samples from the broken weights, as GRPO's did
    assert [(d.step, d.action) for d in callback.guard.decisions] == [(1, "rollback")]  # the update's own step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
