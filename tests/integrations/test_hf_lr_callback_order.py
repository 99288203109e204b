"""A callback that reads the scheduler's ``get_last_lr()`` (an LR logger) sees the values it sees without keel,
wherever it stands in the Trainer's callback list: keel answers the update's LR only until the Trainer makes its
``lr_scheduler.step()`` (reviewer V's V10: one listed before KeelCallback read the finished update's LR at
``on_step_end``, where the bare Trainer shows the next update's)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import train  # noqa: E402


class ReadsTheLR(TrainerCallback):
    """What ``get_last_lr()`` answers at each event of each update."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, list[float]]] = []

    def _read(self, event, state, lr_scheduler):
        self.seen.append((event, state.global_step, list(lr_scheduler.get_last_lr())))

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self._read("step_begin", state, lr_scheduler)

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        self._read("optimizer_step", state, lr_scheduler)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self._read("step_end", state, lr_scheduler)


def test_a_callback_before_or_after_keel_reads_the_learning_rates_of_the_bare_trainer(tmp_path):
    bare = ReadsTheLR()
    train(tmp_path / "bare", [bare], steps=4, accumulate=1)
    before, after = ReadsTheLR(), ReadsTheLR()
    train(tmp_path / "keel", [before, KeelCallback(policy="observe"), after], steps=4, accumulate=1)
    assert before.seen == bare.seen
    assert after.seen == bare.seen
