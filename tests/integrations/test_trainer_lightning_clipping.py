"""A LightningModule that overrides ``configure_gradient_clipping`` (Lightning's documented hook, e.g. the docs'
"clip only from a later epoch on") keeps its clipping under `KeelCallback(policy="skip")`: keel neither nulls the
``gradient_clip_val`` the hook is given nor clips in its place (reviewer V's V13: the hook got ``None`` — a TypeError
in ``clip_grad_norm_`` — and keel clipped from step 0)."""

from __future__ import annotations

import pytest
import torch

from keel.store import RunReader

pytest.importorskip("lightning")
from keel.integrations.lightning import KeelCallback  # noqa: E402
from tests.integrations.test_lightning import STEPS, Regression, fit  # noqa: E402

CLIP_GRAD_NORM = torch.nn.utils.clip_grad_norm_
CLIP = 0.05  # below every step's gradient norm in this run


class ClipsItself(Regression):
    """Clips with its own call and the value Lightning hands the hook."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


class ClipsLate(Regression):
    """The docs' shape: Lightning's clipping only from some point of the run on (here the 6th update)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.trainer.global_step >= 5:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")


def _weights(module_class, callbacks):
    trainer, module = fit(callbacks, module_class=module_class, gradient_clip_val=CLIP, accumulate=1)
    return trainer, [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("module_class", [ClipsItself, ClipsLate])
def test_a_module_clipping_in_its_hook_trains_as_without_keel(module_class):
    _, bare = _weights(module_class, [])
    keel = KeelCallback(policy="skip")
    trainer, guarded = _weights(module_class, [keel])
    assert keel.guard.global_step == STEPS and keel.guard.decisions == []
    assert all(torch.equal(a, b) for a, b in zip(bare, guarded, strict=True))
    assert trainer.gradient_clip_val == CLIP
    assert torch.nn.utils.clip_grad_norm_ is CLIP_GRAD_NORM  # keel's gate on it is gone after fit


def test_keel_detects_on_the_norm_before_the_hooks_clipping(tmp_path):
    keel = KeelCallback(run_dir=str(tmp_path / "run"), policy="skip")
    _weights(ClipsLate, [keel])
    with RunReader(tmp_path / "run") as store:
        steps, norms = store.signal("grad/norm")
    assert steps.tolist() == list(range(STEPS)) and min(norms) > CLIP  # the hook clipped steps 5…9 to CLIP
