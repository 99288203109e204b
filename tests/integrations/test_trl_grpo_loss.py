"""guard_trainer on a GRPOTrainer judges GRPO by TRL's statistics, not by the loss's level: TRL's GRPO loss is a
policy-gradient surrogate of group-normalised advantages, about 0 of either sign. In a healthy 100-step run of TRL's
own ``grpo.py`` (tiny Qwen2, a dense reward) it was ~1e-8 for 20 steps (all completions equally long), then ±0.03;
the default loss spike detector called 15 of those steps ``critical`` ("the loss jumped to -2.7e6× its recent
median"), steps ``policy="skip"`` would have skipped."""

from __future__ import annotations

import numpy as np
import pytest

from keel._core import keys
from keel._core.observation import Observation
from keel.detect import default_detectors, policy_detectors

pytest.importorskip("trl")
from keel.integrations.trl import guard_trainer  # noqa: E402
from tests.integrations import _trl_tiny as tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grpo_losses() -> np.ndarray:
    """The shape of TRL's GRPO loss on a healthy run: ~0 while completions are equally long, then ±0.03."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0.0, 3e-8, 20), rng.normal(-0.03, 0.03, 80)])


def _alarms(detectors) -> list[tuple[int, str, str]]:
    found = []
    for step, loss in enumerate(_grpo_losses()):
        values = {keys.LOSS: float(loss), keys.GRAD_NORM: 0.9 + 0.01 * (step % 3)}
        found += [
            (f.step, f.kind, f.severity) for d in detectors for f in d.update(Observation(step=step, values=values))
        ]
    return [f for f in found if f[2] != "info"]


def test_a_healthy_grpo_loss_raises_no_alarm_under_guard_trainer(tmp_path):
    assert any(severity == "critical" for _, _, severity in _alarms([*default_detectors(), *policy_detectors()]))
    callback = guard_trainer(tiny.grpo_trainer(tmp_path, steps=1))
    assert _alarms(callback.guard_kwargs["detectors"]) == []  # was 'loss_spike' critical at many steps
