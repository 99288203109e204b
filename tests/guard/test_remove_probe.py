"""Guard.remove_probe: one public way to drop a probe mid-setup, keeping the Guard's probe list, the fenced
components the steps run and the store's ``probes`` meta the same (the HF callback used to edit both lists itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel import Guard
from keel._core import keys
from keel._core.errors import GuardClosed
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


class _Hooked:
    """A probe that attaches to the model and must be detached when dropped."""

    name = "hooked"

    def __init__(self) -> None:
        self.attached = self.detached = 0

    def attach(self, model):
        self.attached += 1

    def detach(self):
        self.detached += 1

    def measure(self, ctx):
        return {}

    def after_step(self, ctx):
        return {}


def _guard(run_dir, probes=("loss", "grad_norm")):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, Guard(model, opt, run_dir=str(run_dir), probes=list(probes))


def test_a_removed_probe_leaves_the_guard_the_steps_and_the_store_meta(tmp_path):
    model, opt, guard = _guard(tmp_path)
    guard.remove_probe("loss")
    assert [p.name for p in guard.probes] == [p.name for p in guard.components.probes] == ["grad_norm"]
    for x, y in make_batches(3):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad(set_to_none=True)
    guard.close()
    with RunReader(tmp_path) as store:
        assert store.meta()["probes"] == ["grad_norm"]
        assert keys.LOSS not in store.signal_keys()
        assert any(k.startswith(keys.GRAD_NORM) for k in store.signal_keys())


def test_removing_an_unknown_probe_is_one_clear_error_naming_the_probes_and_changes_nothing(tmp_path):
    _, _, guard = _guard(tmp_path)
    with pytest.raises(ValueError, match=r"Guard.remove_probe\('los'\): no such probe; allowed: 'grad_norm', 'loss'"):
        guard.remove_probe("los")
    assert [p.name for p in guard.probes] == [p.name for p in guard.components.probes] == ["loss", "grad_norm"]
    guard.close()
    with pytest.raises(GuardClosed, match=r"remove_probe\(\) after close"):
        guard.remove_probe("loss")


def test_a_removed_probe_that_attached_to_the_model_is_detached(tmp_path):
    hooked = _Hooked()
    _, _, guard = _guard(tmp_path, probes=("loss", hooked))
    assert hooked.attached == 1
    guard.remove_probe("hooked")
    assert hooked.detached == 1
    guard.close()
    assert hooked.detached == 1  # not detached a second time at close: it is no longer the Guard's
