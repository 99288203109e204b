"""guard_trainer on TRL's RLOOTrainer (`trl rloo`): built like GRPOTrainer (buffered completions, the same
statistics, a surrogate loss near 0), so it gets the same hand-off: the policy detectors instead of the loss-level
ones, TRL's statistics under keel's keys, and the buffer dropped on a rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from keel._core import keys

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import RLOOConfig, RLOOTrainer  # noqa: E402

from keel.harness.bench._trl_tiny import common_args  # noqa: E402
from keel.integrations.trl import META_KEY, guard_trainer  # noqa: E402
from keel.store import RunReader  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 3


def rloo_trainer(out: Path) -> RLOOTrainer:
    tok = tiny.char_tokenizer()
    settings = {"per_device_train_batch_size": 3, "num_generations": 3, "max_completion_length": 8, "beta": 0.0}
    return RLOOTrainer(
        model=tiny.causal_lm(tok),
        reward_funcs=tiny.digit_reward,
        args=RLOOConfig(**common_args(out, STEPS, **settings)),
        train_dataset=Dataset.from_dict({"prompt": [p for p, _, _ in tiny.PAIRS] * 2}),
        processing_class=tok,
    )


def _logged(trainer, name: str) -> list[float]:
    return [h[name] for h in trainer.state.log_history if name in h and "train_runtime" not in h]


def test_rloo_is_guarded_with_its_loss_statistics_and_the_policy_detectors(tmp_path):
    trainer = rloo_trainer(tmp_path / "hf")
    callback = guard_trainer(trainer, run_dir=str(tmp_path / "run"))  # was refused: 'allowed: a trl DPOTrainer, ...'
    names = [d.name for d in callback.guard_kwargs["detectors"]]
    assert "policy_entropy_collapse" in names and "dead_groups" in names and "divergence" not in names
    trainer.train()
    with RunReader(tmp_path / "run") as run:
        assert run.signal(keys.LOSS)[1].tolist() == _logged(trainer, "loss")
        assert run.signal(keys.TRL_ALIASES["entropy"])[1].tolist() == _logged(trainer, "entropy")
        meta = run.meta()[META_KEY]
    assert meta["trainer"] == "RLOOTrainer" and meta["buffer_dropped_at"] == []  # it has GRPO's buffer
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
