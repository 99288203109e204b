"""A Trainer subclass that overrides ``_clip_grad_norm`` (transformers' own hook for how the Trainer clips: per group, a
norm of its own, a clip from some step on) keeps its clipping under `KeelCallback(policy="skip")`. keel took over
clipping by setting ``max_grad_norm`` to 0 during each update, so the Trainer never called the override and keel
clipped with ``max_grad_norm`` in its place, silently (session 14's closing note, the HF half of reviewer V's V13): the
weights differed from the bare Trainer's. keel now finds the Trainer the callback runs in, leaves the clipping to an
override, says so once, and detects on the norm the override returns (the norm before clipping), as the Lightning
callback does for ``configure_gradient_clipping``."""

from __future__ import annotations

import logging

import pytest
import torch

from keel.store import RunReader

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from keel.integrations.hf import KeelCallback  # noqa: E402
from tests.integrations.test_hf import Inject, train  # noqa: E402

STEPS = 4
CLIP = 0.05  # below every step's gradient norm in this run: the override clips every step


class ClipsTighter(Trainer):
    """Clips at its own value (as a subclass might: per group, or a norm of its own), counting its calls."""

    calls: list[int] = []

    def _clip_grad_norm(self, model):
        self.calls.append(self.state.global_step)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)


def _run(tmp_path, callbacks, trainer_class=ClipsTighter, **kwargs):
    ClipsTighter.calls = []
    trainer = train(tmp_path, callbacks, steps=STEPS, accumulate=1, trainer_class=trainer_class, **kwargs)
    return trainer, [p.detach().clone() for p in trainer.model.parameters()], list(ClipsTighter.calls)


def test_an_overridden_clip_grad_norm_is_called_and_training_is_the_bare_trainers(tmp_path, caplog):
    _, bare, bare_calls = _run(tmp_path / "bare", [])
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    with caplog.at_level(logging.WARNING, logger="keel"):
        trainer, guarded, calls = _run(tmp_path / "keel", [keel])
    assert calls == bare_calls == list(range(STEPS))  # before: [] under keel
    assert all(torch.equal(a, b) for a, b in zip(bare, guarded, strict=True))
    assert trainer.args.max_grad_norm == 1.0 and "_clip_grad_norm" not in vars(trainer)  # keel's gate is gone
    said = [r.getMessage() for r in caplog.records if "_clip_grad_norm" in r.getMessage()]
    assert said == [
        "ClipsTighter overrides the Trainer's _clip_grad_norm: it keeps clipping (max_grad_norm=1.0), keel does not "
        "clip in its place, and detects on the norm it returns (before clipping)"
    ]
    with RunReader(tmp_path / "run") as store:
        steps, norms = store.signal("grad/norm")
        _, clipped = store.signal("grad/clipped_norm")
    assert steps.tolist() == list(range(STEPS)) and min(norms) > CLIP  # the norm before the override clipped
    assert max(clipped) == pytest.approx(CLIP, rel=1e-3)


@pytest.mark.slow  # ~1.5 s each: the first test backs the override by default
def test_a_nan_loss_under_an_overridden_clip_is_still_skipped(tmp_path):
    keel = KeelCallback(policy="skip")
    _, weights, calls = _run(tmp_path, [Inject({2: "loss"}), keel])
    assert calls == list(range(STEPS))
    assert [d.action for d in keel.guard.decisions] == ["skip"] and all(w.isfinite().all() for w in weights)


@pytest.mark.slow
def test_the_trainers_own_clip_grad_norm_is_still_taken_over(tmp_path):
    seen = []

    class Counts(Trainer):
        def training_step(self, *args, **kwargs):
            seen.append(self.args.max_grad_norm)
            return super().training_step(*args, **kwargs)

    _run(tmp_path, [KeelCallback(policy="skip")], trainer_class=Counts)
    assert seen == [0.0] * STEPS  # keel clips: the Trainer's setting is 0 during each update


@pytest.mark.slow
def test_observe_with_an_overridden_clip_stays_bit_identical_and_says_nothing(tmp_path, caplog):
    _, bare, _ = _run(tmp_path / "bare", [])
    with caplog.at_level(logging.WARNING, logger="keel"):
        _, observed, calls = _run(tmp_path / "keel", [KeelCallback(policy="observe")])
    assert calls == list(range(STEPS)) and all(torch.equal(a, b) for a, b in zip(bare, observed, strict=True))
    assert not [r for r in caplog.records if "_clip_grad_norm" in r.getMessage()]  # keel never took clipping over
