"""dense_to_sparse's update count is model state (reviewer V13): a resume by docs/stabilize.md's recipe, a
``keel.Guard(resume=True)`` and a rollback continue the EvoMoE schedule where the saved state was, instead of
restarting it at update −1 (dense routing at τ = 1) or counting the abandoned updates; under ``torch.compile`` the
gate does not recompile once per update."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

from keel import Guard, RecoveryConfig
from keel.nn import DenseToSparseSchedule, create_stabilizer, load_stabilized, stabilize, stabilize_record
from keel.nn.dense_to_sparse_gate import UPDATE_BUFFER
from tests.integrations.test_compile import GraphCounter
from tests.nn.test_moe_stabilizers import D, E, TinyMoE, _model

HARD_STEP = 2


def _stabilized(seed: int = 0, hard_step: int = HARD_STEP) -> tuple[TinyMoE, DenseToSparseSchedule]:
    model = _model(seed, layers=2)
    schedule = stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=hard_step)]).changes[0].extra
    return model, schedule


def _widths(model: TinyMoE) -> list[int]:
    """Experts per token each training forward of ``model`` routes to from now on (E dense, 1 hard)."""
    seen: list[int] = []
    model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].shape[-1]))
    return seen


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    torch.manual_seed(seed)  # the Gumbel noise
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _counters(model: nn.Module) -> list[int]:
    return [int(b) for n, b in model.named_buffers() if n.endswith(UPDATE_BUFFER)]


@pytest.mark.parametrize("follow", [False, True])
def test_a_resume_by_the_docs_recipe_continues_the_schedule_bit_identically(follow: bool) -> None:
    model, schedule = _stabilized()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if follow:
        schedule.follow(optimizer)
    _train(model, optimizer, 3, seed=1)
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stabilize": stabilize_record(model)}
    )
    assert _counters(model) == [schedule.update] * 2 == [3 if follow else 2] * 2  # in the state dict, every router

    resumed = _model(seed=5, layers=2)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed_schedule = load_stabilized(resumed, checkpoint["model"], checkpoint["stabilize"]).changes[0].extra
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    if follow:
        resumed_schedule.follow(resumed_optimizer)
    assert resumed_schedule.update == schedule.update and resumed_schedule.is_hard()
    assert resumed_schedule.temperature() == schedule.temperature() == 0.5
    widths = _widths(resumed)
    assert _train(resumed, resumed_optimizer, 2, seed=7) == _train(model, optimizer, 2, seed=7)
    assert widths == [1, 1]  # hard top-1, as the run it continues (before: dense over all E again, τ = 1)
    assert resumed_schedule.update == schedule.update


def _guarded_steps(model: nn.Module, guard: Guard, steps: int) -> None:
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        guard.step(loss)
        guard.optimizer.zero_grad()
        if guard.recovery.disk is not None:
            guard.recovery.disk.wait()  # a write still under way when the next is due is not made


def test_a_rollback_restores_the_count_of_its_snapshot_and_drops_the_abandoned_updates() -> None:
    model, schedule = _stabilized(hard_step=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, policy="recover", recovery=RecoveryConfig(snapshot_every=1))
    try:
        _guarded_steps(model, guard, 5)
        assert schedule.update == 4
        rolled = guard.recovery.rollback(5, 3, (), rollbacks_in_window=1)
        assert rolled is not None and 1 <= rolled.snapshot.step <= 2
        # the snapshot of step s (s updates done) holds update s - 1: the updates after it are not counted
        assert schedule.update == rolled.snapshot.step - 1 and _counters(model) == [schedule.update] * 2
        widths = _widths(model)
        _guarded_steps(model, guard, 4 - rolled.snapshot.step)
        assert widths[:-1] == [E] * (3 - rolled.snapshot.step) and widths[-1] == 1  # dense until update 3, as before
    finally:
        guard.close()


def test_a_guard_resume_from_disk_continues_the_count(tmp_path) -> None:
    model, schedule = _stabilized(hard_step=3)
    config = RecoveryConfig(snapshot_every=1, disk_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, run_dir=str(tmp_path), policy="recover", recovery=config)
    _guarded_steps(model, guard, 5)
    guard.close()
    resumed, resumed_schedule = _stabilized(seed=5, hard_step=3)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed_guard = Guard(resumed, resumed_optimizer, run_dir=str(tmp_path), policy="recover", resume=True)
    try:
        assert resumed_schedule.update == schedule.update == 4 and resumed_schedule.is_hard()
        assert _counters(resumed) == [4, 4]
    finally:
        resumed_guard.close()


def test_a_state_dict_from_before_the_count_was_saved_loads_with_a_warning_and_keeps_the_count() -> None:
    model, schedule = _stabilized()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, seed=1)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(UPDATE_BUFFER)}
    fresh, fresh_schedule = _stabilized(seed=5)
    with pytest.warns(UserWarning, match=r"no dense_to_sparse_update .* stays at update -1; set .*schedule.update"):
        fresh.load_state_dict(old)  # strict: the missing count is not an error
    assert fresh_schedule.update == -1 and _counters(fresh) == [-1, -1]
    torch.testing.assert_close(fresh.state_dict()["layers.0.mlp.gate.weight"], old["layers.0.mlp.gate.weight"])


def test_load_stabilized_takes_a_checkpoint_saved_before_the_count_was(tmp_path) -> None:
    # its key check refused the two missing count buffers before the router's load hook could run (helper M)
    model = _model(0, layers=2)
    stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=2)])
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(UPDATE_BUFFER)}
    with pytest.warns(UserWarning, match="no dense_to_sparse_update"):
        loaded = load_stabilized(_model(1, layers=2), old, stabilize_record(model))
    assert loaded is not None


def test_a_count_written_from_outside_is_read_once_and_kept_on_every_router() -> None:
    model, schedule = _stabilized()
    state = copy.deepcopy(model.state_dict())
    state["layers.0.mlp.gate." + UPDATE_BUFFER].fill_(6)
    state["layers.1.mlp.gate." + UPDATE_BUFFER].fill_(6)
    model.load_state_dict(state, assign=True)  # new buffer objects: seen by identity, not only by version
    assert schedule.update == 6 and schedule.is_hard()
    schedule.update = 0
    assert _counters(model) == [0, 0] and not schedule.is_hard()
    widths = _widths(model)
    _train(model, torch.optim.SGD(model.parameters(), lr=0.0), 2, seed=1)
    assert widths == [E, 1] and _counters(model) == [2, 2]  # updates 1 (dense) and 2 (hard)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(torch.randn(2, D, dtype=torch.float64))  # eval: top-1 of the softmax, not counted
    assert schedule.update == 2


def test_a_compiled_model_recompiles_once_at_the_hard_switch_not_per_update() -> None:
    torch._dynamo.reset()
    model = _model(layers=1)
    schedule = stabilize(model, [create_stabilizer("dense_to_sparse", hard_step=2)]).changes[0].extra
    backend = GraphCounter()
    forward = torch.compile(model, backend=backend)
    x = torch.randn(3, D, dtype=torch.float64)
    compiled = []
    for _ in range(4):
        before = backend.compiled
        forward(x).sum().backward()
        compiled.append(backend.compiled - before)
    assert schedule.update == 3 and _counters(model) == [3]
    # τ anneals inside the graph (the count is a buffer); only the phase is a guard. Before: a recompilation at every
    # update (dynamo guarded on the host count) until the recompile limit sent the gate back to eager.
    assert compiled[1:] == [0, 1, 0], compiled
