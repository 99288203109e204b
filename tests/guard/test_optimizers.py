"""keel.Optimizers / keel.Schedulers: several optimizers (a Muon recipe's Muon + AdamW) stepped, skipped, snapshotted
and restored as one — by Guard.step and by keel.watch on the loop's own calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import keel
from keel._core.errors import TrainingAborted


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.embed(x)))))


def _two_optimizers(model: Net) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW on the embedding and head, SGD with momentum on the body (Muon's place), as modded-nanogpt splits them."""
    adamw = torch.optim.AdamW([*model.embed.parameters(), *model.head.parameters()], lr=1e-2)
    body = torch.optim.SGD(model.body.parameters(), lr=0.05, momentum=0.9)
    return adamw, body


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_state_dict_is_torchs_layout_and_loads_back_into_each_part():
    torch.manual_seed(0)
    model = Net()
    adamw, body = _two_optimizers(model)
    for x, y in _batches(3):
        nn.functional.mse_loss(model(x), y).backward()
        adamw.step(), body.step()
    group = keel.Optimizers(adamw, body)
    saved = group.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1, 2, 3], [4, 5]]
    assert set(saved["state"]) == {0, 1, 2, 3, 4, 5} and "momentum_buffer" in saved["state"][4]
    expect = [adamw.state_dict(), body.state_dict()]
    for opt in (adamw, body):
        opt.state.clear()
    group.load_state_dict(saved)
    for opt, want in zip((adamw, body), expect, strict=True):
        got = opt.state_dict()
        assert got["param_groups"] == want["param_groups"]
        for i, entry in want["state"].items():
            assert all(torch.equal(got["state"][i][k], v) for k, v in entry.items() if isinstance(v, torch.Tensor))
    assert group.state.get(model.body.weight) is body.state[model.body.weight]  # one view over the parts


def test_an_lr_written_into_the_groups_reaches_the_part():
    model = Net()
    adamw, body = _two_optimizers(model)
    group = keel.Optimizers(adamw, body)
    group.param_groups[1]["lr"] = 0.5
    assert body.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((), r"Optimizers\(0 optimizer\(s\)\); allowed: two or more"),
        (("sgd",), r"1 optimizer"),
        (("adamw", "not an optimizer"), r"argument 1 is str"),
        (("adamw", "adamw_again"), r"in optimizers 0 and 1; allowed: optimizers over disjoint parameters"),
    ],
)
def test_bad_optimizers_are_one_clear_error(args, match):
    model = Net()
    make = {
        "sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1),
        "adamw": lambda: torch.optim.AdamW(model.parameters()),
        "adamw_again": lambda: torch.optim.AdamW(model.parameters()),
        "not an optimizer": lambda: "not an optimizer",
    }
    with pytest.raises(ValueError, match=match):
        keel.Optimizers(*(make[a]() for a in args))


def test_guard_refuses_an_optimizer_whose_state_dict_is_not_torchs_layout():
    class Wrapper:  # h22-O O2: a duck-typed wrapper passed the check, then Guard() died on KeyError 'param_groups'
        def __init__(self, opt):
            self.opt, self.param_groups = opt, opt.param_groups

        def step(self):
            self.opt.step()

        def state_dict(self):
            return {"parts": [self.opt.state_dict()]}

    model = Net()
    with pytest.raises(ValueError, match=r"optimizer=Wrapper: its state_dict\(\) is \['parts'\], not torch's layout"):
        keel.Guard(model, Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)), policy="recover")


# --- keel.watch on a loop that steps two optimizers and two schedulers ---------------------------------------------
def _muon_style_loop(policy: str | None, *, bad: tuple[int, ...] = (), corrupt: int | None = None, steps: int = 12):
    """modded-nanogpt's shape: ``for opt, sched in zip(optimizers, schedulers): opt.step(); sched.step()``."""
    torch.manual_seed(0)
    model = Net()
    optimizers = _two_optimizers(model)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100) for opt in optimizers]
    guard = None
    if policy is not None:
        guard = keel.watch(
            model,
            list(optimizers),
            schedulers,
            policy=policy,
            recovery=keel.RecoveryConfig(snapshot_every=4, quiet_steps=0),
        )
    history = []
    try:
        for step, (x, y) in enumerate(_batches(steps)):
            nn.functional.mse_loss(model(x), y).backward()
            if step in bad:
                model.body.weight.grad[0, 0] = float("nan")
            for opt, sched in zip(optimizers, schedulers, strict=True):
                opt.step()
                sched.step()
            for opt in optimizers:
                opt.zero_grad()
            if step == corrupt:
                with torch.no_grad():
                    model.embed.weight[0, 0] = float("inf")  # written between steps: the AdamW part's parameter
            history.append((_params(model), [s.get_last_lr()[0] for s in schedulers]))
    finally:
        if guard is not None:
            guard.close()
    return guard, history


def test_under_observe_a_two_optimizer_loop_is_bit_identical_to_the_bare_loop():
    _, bare = _muon_style_loop(None)
    _, watched = _muon_style_loop("observe")
    for (p, lr), (q, lr_q) in zip(bare, watched, strict=True):
        assert lr == lr_q and all(torch.equal(a, b) for a, b in zip(p, q, strict=True))


def test_a_skip_holds_back_both_optimizers_and_both_schedulers():
    guard, history = _muon_style_loop("skip", bad=(5,))
    assert [(d.step, d.action) for d in guard.decisions] == [(5, "skip")]
    (before, lrs_before), (after, lrs_after) = history[4], history[5]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # neither part stepped
    assert lrs_after == lrs_before  # neither scheduler advanced
    assert guard.global_step == 12  # one keel step per update, not one per optimizer


def test_a_corrupted_weight_of_the_second_optimizer_is_rolled_back_not_aborted():
    guard, history = _muon_style_loop("recover", corrupt=6)
    rollbacks = [d for d in guard.decisions if d.action == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0].step == 7  # was an abort: the snapshot "left out" embed.weight
    assert all(torch.isfinite(p).all() for p in history[-1][0])


def test_a_scaler_with_several_optimizers_is_refused():
    model = Net()
    with pytest.raises(ValueError, match="scaler with 2 optimizers: not supported"):
        keel.watch(model, list(_two_optimizers(model)), scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_an_abort_with_several_optimizers_unhooks_every_part():
    model = Net()
    adamw, body = _two_optimizers(model)
    guard = keel.watch(model, [adamw, body], policy="skip")
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    with torch.no_grad():
        model.body.weight[0, 0] = float("nan")
    adamw.step()  # keel decides at the last optimizer's step() call of the update
    with pytest.raises(TrainingAborted):
        body.step()
    assert "step" not in vars(adamw) and "step" not in vars(body)
    guard.close()


def test_optimizers_deep_copy_and_pickle_with_their_parts():
    import copy
    import pickle

    model = Net()
    group = keel.Optimizers(*_two_optimizers(model))
    for clone in (copy.deepcopy(group), pickle.loads(pickle.dumps(group))):
        assert [type(o) for o in clone.optimizers] == [torch.optim.AdamW, torch.optim.SGD]
        assert len(clone.param_groups) == 2 and clone.state_dict()["param_groups"][1]["params"] == [4, 5]


def test_guard_refuses_a_metric_stepped_scheduler_inside_schedulers():
    model = Net()
    adamw, body = _two_optimizers(model)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(body)
    schedulers = keel.Schedulers(torch.optim.lr_scheduler.StepLR(adamw, 5), plateau)
    with pytest.raises(ValueError, match=r"scheduler=ReduceLROnPlateau: its step\(\) needs an argument"):
        keel.Guard(model, keel.Optimizers(adamw, body), schedulers)
    keel.Guard(model, keel.Optimizers(adamw, body), schedulers, steps_scheduler=False).close()


def test_a_backward_between_the_optimizers_calls_of_one_update_is_refused_before_it_runs():
    """A GAN-shaped loop (a backward per optimizer) is not one update: keel stepped both at the first call, and the
    loop crashed in autograd at the next iteration after a warning (session 11). Now one error, before this backward
    runs, and the loop's objects are put back; neither optimizer stepped (keel waits for the last one's call)."""
    model = Net()
    adamw, body = _two_optimizers(model)
    backward = torch.Tensor.backward
    guard = keel.watch(model, [adamw, body])
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    adamw.step()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"a backward\(\) ran between their step\(\) calls.*keel.watch\(netD, opt"):
        nn.functional.mse_loss(model(x), y).backward()
    assert [torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True)] == [True] * len(grads)
    assert "step" not in vars(adamw) and "step" not in vars(body)  # the watch closed: the originals are back
    assert torch.Tensor.backward is backward and guard.guard._closed


def test_a_zero_redundancy_optimizer_is_refused_with_one_clear_error(tmp_path):
    """Its state_dict() needs a collective consolidate_state_dict() first: keel's construction raised torch's
    'Optimizer state has not been consolidated' from deep inside (helper A, h26)."""
    script = tmp_path / "zero.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.optim import ZeroRedundancyOptimizer\n"
        "import keel\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/rendezvous', rank=0, world_size=1)\n"
        "model = torch.nn.Linear(4, 2)\n"
        "opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.Adam, lr=0.01)\n"
        "try:\n"
        "    keel.Guard(model, opt)\n"
        "except ValueError as exc:\n"
        "    print('REFUSED', exc)\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED optimizer=ZeroRedundancyOptimizer: its state_dict() raised RuntimeError" in done.stdout
    assert "ZeroRedundancyOptimizer is not supported" in done.stdout
