"""Every registered probe: never mutates training state, emits documented keys, survives edge cases."""

import copy

import pytest
import torch

from keel.guard import Guard
from keel.signals import PROBES, create_probe, list_probes
from tests.conftest import TinyNet, make_batches
from tests.signals.contexts import step_context


def _state(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
    )


@pytest.mark.parametrize("name", list_probes())
def test_probe_leaves_params_grads_and_optimizer_state_bit_identical(name):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in make_batches(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    x, y = make_batches(1, seed=9)[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    before = _state(model, opt)
    probe = create_probe(name)
    if hasattr(probe, "attach"):
        probe.attach(model)
    ctx = step_context(model, opt, loss=loss)
    out = probe.measure(ctx)
    out.update(probe.after_step(ctx))
    after = _state(model, opt)
    for b, a in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert torch.equal(b, a)
    assert before[2]["state"].keys() == after[2]["state"].keys()
    for k in before[2]["state"]:
        for field, value in before[2]["state"][k].items():
            assert torch.equal(value, after[2]["state"][k][field])
    assert probe.name == name
    assert PROBES.get(name).__module__.rsplit(".", 1)[-1] == name  # registry name == file stem


def test_default_probe_keys_reach_the_store(tmp_path):
    from keel.store import RunReader

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, run_dir=str(tmp_path), probes="full", log_every=2) as guard:
        for x, y in make_batches(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    keys = set(RunReader(tmp_path).signal_keys())
    assert {"loss", "grad/norm", "param/norm", "update/norm", "update/ratio", "lr", "time/step"} <= keys
    assert {"grad/norm/fc1.weight", "param/norm/fc2.bias", "update/ratio/fc1.bias"} <= keys
    steps, _ = RunReader(tmp_path).signal("update/ratio/fc1.bias")
    assert steps.tolist() == [0, 2]  # log_every=2, recorded at the step whose update it measures
