"""guard_trainer on TRL's KTOTrainer (`trl kto`): unpaired preference data (a completion and whether it is
desirable). keel records the KTO loss the trainer logs and TRL's KTO statistics under keel's keys."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import KTOConfig, KTOTrainer  # noqa: E402

from keel._core import keys  # noqa: E402
from keel.harness.bench._trl_tiny import common_args  # noqa: E402
from keel.integrations.trl import META_KEY, guard_trainer  # noqa: E402
from keel.store import RunReader  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 3


def kto_trainer(out: Path) -> KTOTrainer:
    tok = tiny.char_tokenizer()
    model = tiny.causal_lm(tok)
    rows = [(p, c if i % 2 else r, bool(i % 2)) for i, (p, c, r) in enumerate(tiny.PAIRS * 2)]  # right sums desirable
    data = Dataset.from_dict(
        {name: [row[i] for row in rows] for i, name in enumerate(("prompt", "completion", "label"))}
    )
    args = KTOConfig(**common_args(out, STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2))
    return KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tok)


def _logged(trainer, name: str) -> list[float]:
    return [h[name] for h in trainer.state.log_history if name in h and "train_runtime" not in h]


def test_kto_loss_and_statistics_reach_keel_with_accumulation(tmp_path):
    trainer = kto_trainer(tmp_path / "hf")
    guard_trainer(trainer, run_dir=str(tmp_path / "run"))  # was refused (not in the list of guarded trainers)
    trainer.train()
    with RunReader(tmp_path / "run") as run:
        assert run.signal(keys.LOSS)[1].tolist() == pytest.approx(_logged(trainer, "loss"), rel=1e-6)
        assert run.signal(keys.TRL_ALIASES["rewards/margins"])[1].tolist() == pytest.approx(
            _logged(trainer, "rewards/margins"), rel=1e-6
        )
        assert run.meta()[META_KEY]["trainer"] == "KTOTrainer"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
