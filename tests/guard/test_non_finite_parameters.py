"""A parameter written NaN/Inf between two steps (an in-place bug, a bad checkpoint load, a flipped bit) is found
at the next step whatever the parameter-norm probe's cadence, named, and rolled back at once under ``recover``
(aborted under ``skip``): no skip mends a parameter.

Before, the parameters were read only every ``log_every`` steps: the non-finite gradients they cause looked like a
skippable step, so keel skipped ten updates, then rolled back (found running build-nanogpt under keel.watch).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import keel
from keel.proxy import create_proxy_model

CORRUPT_AFTER = 6  # the step after whose update a weight is overwritten


def _run(policy: str, *, value: float = math.inf, steps: int = 10) -> tuple[list, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = keel.Guard(model, opt, policy=policy, log_every=50, recovery=keel.RecoveryConfig(snapshot_every=2))
    g = torch.Generator().manual_seed(0)
    decisions = []
    try:
        for step in range(steps):
            x = torch.randint(0, 256, (2, 9), generator=g)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            decisions.append(guard.step(loss))
            opt.zero_grad(set_to_none=True)
            if step == CORRUPT_AFTER:
                with torch.no_grad():
                    model.blocks[0].attn.qkv.weight[0, 0] = value
    except keel.TrainingAborted as aborted:
        decisions.append(aborted.decision)
    guard.close()
    return decisions, model


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_a_corrupted_parameter_is_named_and_rolled_back_at_the_next_step(value):
    decisions, model = _run("recover", value=value)
    bad = decisions[CORRUPT_AFTER + 1]
    assert (bad.action, bad.restored_step) == ("rollback", CORRUPT_AFTER)
    (finding,) = [f for f in bad.findings if f.kind == "non_finite"]
    assert finding.signal == "param/norm" and finding.evidence["parameters"] == ["blocks.0.attn.qkv.weight"]
    assert [d.action for d in decisions[CORRUPT_AFTER + 2 :]] == ["ok"] * 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_under_skip_a_corrupted_parameter_aborts_the_run_at_once_instead_of_ten_skips():
    decisions, _ = _run("skip")
    assert [d.action for d in decisions[CORRUPT_AFTER:]] == ["ok", "abort"]
    assert "non-finite parameters" in decisions[-1].reason


def test_a_healthy_run_reads_the_parameters_only_at_the_probes_cadence(monkeypatch):
    calls = []
    import keel.guard.guard as guard_module

    real = guard_module.parameter_norms
    monkeypatch.setattr(guard_module, "parameter_norms", lambda *a: calls.append(1) or real(*a))
    decisions, _ = _run("recover", steps=CORRUPT_AFTER)
    assert [d.action for d in decisions] == ["ok"] * CORRUPT_AFTER and calls == []


@pytest.mark.parametrize("shape", ["guard", "watch"])
def test_a_model_non_finite_before_training_aborts_at_step_0_naming_it_with_no_rollback(shape):
    """Reviewer V8: a weight NaN before the Guard's first step got a "rollback to the snapshot of step 0" (the same
    NaN state, restored), then an abort at step 1. The first step's state is the damaged one: nothing keel keeps
    precedes it, so the run aborts at once, naming the parameter."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = math.nan
    kwargs = {"policy": "recover", "recovery": keel.RecoveryConfig(snapshot_every=2)}
    guard = keel.Guard(model, opt, **kwargs) if shape == "guard" else keel.watch(model, opt, **kwargs)
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    with pytest.raises(keel.TrainingAborted) as aborted:
        guard.step(loss) if shape == "guard" else opt.step()
    assert aborted.value.decision.step == 0 and aborted.value.decision.restored_step is None
    assert "blocks.0.attn.qkv.weight" in aborted.value.decision.reason
    assert "before the first update" in aborted.value.decision.reason
    assert [d.action for d in guard.decisions] == ["abort"]
    guard.close()


@pytest.mark.parametrize("where", ["loop", "update"])
def test_with_no_rollback_margin_a_non_finite_parameter_is_not_restored_from_the_state_it_was_found_in(where):
    """A snapshot of step k is the state the parameters are read from at step k: with rollback_margin=0, non-finite
    parameters found at step 4 (written by the loop after step 3) were "rolled back" to the snapshot of step 4, NaN
    included. An update that writes them itself (update 3 with a NaN weight decay) is rolled back at step 3 already,
    by the check after the update (`keel.guard.weights_check`), to a snapshot from before it. (A NaN learning rate
    is an lr_surge: skipped before it is applied.)"""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    config = keel.RecoveryConfig(snapshot_every=1, rollback_margin=0, quiet_steps=0)
    guard = keel.Guard(model, opt, policy="recover", log_every=50, recovery=config)
    g = torch.Generator().manual_seed(0)
    decisions = []
    for step in range(6):
        x = torch.randint(0, 256, (2, 9), generator=g)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.param_groups[0]["weight_decay"] = math.nan if step == 3 and where == "update" else 0.0  # NaN everywhere
        decisions.append(guard.step(loss))
        opt.zero_grad(set_to_none=True)
        if step == 3 and where == "loop":
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
    guard.close()
    if where == "loop":
        assert (decisions[4].action, decisions[4].restored_step) == ("rollback", 3)
    else:
        assert decisions[3].action == "rollback" and decisions[3].restored_step <= 3
        assert [d.action for d in decisions[4:]] == ["ok", "ok"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
