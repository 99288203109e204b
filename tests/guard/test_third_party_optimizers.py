"""keel around optimizers whose state is not Adam's: SOAP, Shampoo, Muon, Lion, Prodigy, schedule-free AdamW,
Adafactor, LAMB, D-Adaptation (PyPI's ``pytorch_optimizer``) and torch's own Muon and Adafactor.

Outside-in: each is built as its documentation shows it (pytorch_optimizer's Muon with ``use_muon`` groups, torch's
Muon on the matrices beside an AdamW, schedule-free AdamW switched to ``train()``), and a loop of the plain shape
injects what keel exists for — a NaN gradient, an Inf written into a weight between steps. What must hold for every
one: a skip leaves the weights and the whole optimizer state bit-identical (the state compared field by field, also
inside the objects ScalableShampoo keeps), a rollback restores them bit-exact to a copy the loop took at the
restored step, a disk resume loads that copy into fresh objects, and keel records no error of its own.

The tests that need ``pytorch_optimizer`` skip without it (it is in the ``dev`` extra).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import keel

NAN_GRADIENT_AT, INF_WEIGHT_AT, STEPS = 4, 9, 12  # snapshots every 3 steps: the rollback restores step 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def _matrices_and_rest(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    return [p for p in model.parameters() if p.ndim == 2], [p for p in model.parameters() if p.ndim != 2]


def _po() -> Any:
    return pytest.importorskip("pytorch_optimizer")


def _po_muon(model: nn.Module) -> torch.optim.Optimizer:
    mats, rest = _matrices_and_rest(model)
    return _po().Muon([{"params": mats, "use_muon": True}, {"params": rest, "use_muon": False}], lr=0.02)


def _torch_muon_and_adamw(model: nn.Module) -> torch.optim.Optimizer:
    mats, rest = _matrices_and_rest(model)
    muon = torch.optim.Muon(mats, lr=0.02, adjust_lr_fn="match_rms_adamw")
    return keel.Optimizers(muon, torch.optim.AdamW(rest, lr=1e-3))


def _schedule_free(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = _po().ScheduleFreeAdamW(model.parameters(), lr=2.5e-3)
    optimizer.train()
    return optimizer


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SOAP": lambda m: _po().SOAP(m.parameters(), lr=3e-3, precondition_frequency=2),
    "ScheduleFreeAdamW": _schedule_free,
    "Muon(pytorch_optimizer)": _po_muon,
    "torch Muon + AdamW": _torch_muon_and_adamw,
    "torch Adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
    "Shampoo": lambda m: _po().Shampoo(m.parameters(), lr=1e-2, preconditioning_compute_steps=2),
    "ScalableShampoo": lambda m: _po().ScalableShampoo(
        m.parameters(), lr=1e-3, start_preconditioning_step=3, preconditioning_compute_steps=2
    ),
    "Lion": lambda m: _po().Lion(m.parameters(), lr=1e-4),
    "Prodigy": lambda m: _po().Prodigy(m.parameters(), lr=1.0),
    "AdaFactor(pytorch_optimizer)": lambda m: _po().AdaFactor(m.parameters(), lr=1e-3),
    "Lamb": lambda m: _po().Lamb(m.parameters(), lr=1e-3),
    "DAdaptAdam": lambda m: _po().DAdaptAdam(m.parameters(), lr=0.1),
    "Kron": lambda m: _po().Kron(m.parameters(), lr=1e-3),  # precondition_dtype (a torch.dtype) in its groups
}
DEFAULT_SUITE = {"torch Muon + AdamW", "torch Adafactor"}
# the rest run under -m slow (importing pytorch_optimizer takes ~2 s: it imports transformers)
# ScalableShampoo's state holds Python objects, which keel does not write to disk
NO_DISK = {"ScalableShampoo"}


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(32, 8, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _held(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The weights and the optimizer's whole state_dict, copied."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two states differ, bit for bit (NaN equals NaN; tensors by their bytes, objects by their fields)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if not both or (a.shape, a.dtype) != (b.shape, b.dtype):
            return [f"{path}: {a!r:.60} vs {b!r:.60}"]
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return [] if torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)) else [f"{path}: tensor"]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))}"] if a.keys() != b.keys() else []
        return keys + [d for k in a.keys() & b.keys() for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}/{i}")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, type):
        return _differences(vars(a), vars(b), f"{path}.{type(a).__name__}")
    return [] if a == b else [f"{path}: {a!r:.60} vs {b!r:.60}"]


def _run(
    model: nn.Module, optimizer: torch.optim.Optimizer, guard: keel.Guard
) -> tuple[list[str], dict[int, tuple[list[torch.Tensor], dict[str, Any]]]]:
    """Train ``STEPS`` steps with a NaN gradient and an Inf weight injected: (where the skip and the rollback left
    the weights or the optimizer state other than the loop's copy — empty when bit-exact, the loop's copies by step
    (the state after that many updates))."""
    problems: list[str] = []
    copies, actions = {}, []
    for i in range(STEPS):
        x, y = _batch(i)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == NAN_GRADIENT_AT:
            next(model.parameters()).grad[0, 0] = float("nan")
        if i == INF_WEIGHT_AT:
            with torch.no_grad():
                list(model.parameters())[2][0, 0] = float("inf")  # written between steps, by the loop
        step = guard.global_step
        copies[step] = _held(model, optimizer)
        decision = guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
        actions.append(decision.action)
        if decision.action == "skip":
            problems += _differences(copies[step], _held(model, optimizer), f"skip {i}")
        if decision.action == "rollback":
            problems += _differences(copies[decision.restored_step], _held(model, optimizer), f"rollback {i}")
    expected = ["skip" if i == NAN_GRADIENT_AT else "rollback" if i == INF_WEIGHT_AT else "ok" for i in range(STEPS)]
    assert actions == expected
    assert not [f for f in guard.findings if f.kind == "keel_error"]
    return problems, copies


def _params(names: set[str]) -> list[Any]:
    marks = {name: () if name in names else (pytest.mark.slow,) for name in OPTIMIZERS}
    return [pytest.param(name, id=name, marks=marks[name]) for name in OPTIMIZERS]


@pytest.mark.parametrize("name", _params(DEFAULT_SUITE))
def test_skip_rollback_and_resume_are_bit_exact(name: str, tmp_path: Path) -> None:
    config = keel.RecoveryConfig(snapshot_every=3, disk_every=1, quiet_steps=0)
    model = _model()
    optimizer = OPTIMIZERS[name](model)
    with keel.Guard(model, optimizer, run_dir=str(tmp_path), policy="recover", recovery=config) as guard:
        problems, copies = _run(model, optimizer, guard)
    assert problems == []

    fresh_model = _model()
    with torch.no_grad():
        for p in fresh_model.parameters():
            p.add_(1.0)  # not the run's weights: the resume must bring them
    fresh = OPTIMIZERS[name](fresh_model)
    with keel.Guard(fresh_model, fresh, run_dir=str(tmp_path), policy="recover", resume=True, recovery=config) as g:
        resumed_at = g.global_step
    if name in NO_DISK:  # its state holds objects keel does not pickle: only the empty step-0 state is on disk
        assert resumed_at == 0
        return
    newest = max(int(d.name.removeprefix("step-")) for d in (tmp_path / "snapshots").iterdir())
    assert resumed_at == newest > INF_WEIGHT_AT  # the newest disk snapshot, taken after the rollback
    assert _differences(copies[resumed_at], _held(fresh_model, fresh), "resume") == []


@pytest.mark.parametrize("name", _params({"torch Muon + AdamW"}))
def test_keel_watch_skips_and_rolls_back_bit_exact_when_the_loop_steps(name: str, tmp_path: Path) -> None:
    model = _model()
    optimizer = OPTIMIZERS[name](model)
    parts = list(optimizer.optimizers) if isinstance(optimizer, keel.Optimizers) else optimizer
    config = keel.RecoveryConfig(snapshot_every=3, quiet_steps=0)
    copies, problems = {}, []
    with keel.watch(model, parts, run_dir=str(tmp_path), policy="recover", recovery=config) as guard:
        for i in range(STEPS):
            x, y = _batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            if i == NAN_GRADIENT_AT:
                next(model.parameters()).grad[0, 0] = float("nan")
            if i == INF_WEIGHT_AT:
                with torch.no_grad():
                    list(model.parameters())[2][0, 0] = float("inf")
            step, seen = guard.global_step, len(guard.decisions)
            copies[step] = _held(model, optimizer)
            for part in parts if isinstance(parts, list) else [parts]:
                part.step()
            optimizer.zero_grad(set_to_none=True)
            for decision in guard.decisions[seen:]:
                restored = step if decision.action == "skip" else decision.restored_step
                problems += _differences(copies[restored], _held(model, optimizer), f"{decision.action} {i}")
        assert [d.action for d in guard.decisions] == ["skip", "rollback"]
        assert not [f for f in guard.findings if f.kind == "keel_error"]
    assert problems == []


# --- schedule-free: the parameters move between steps (optimizer.eval() / optimizer.train()) ------------------------
def _schedule_free_makers() -> dict[str, Callable[[nn.Module], Any]]:
    schedulefree = pytest.importorskip("schedulefree")
    return {
        "AdamWScheduleFree": lambda m: schedulefree.AdamWScheduleFree(m.parameters(), lr=2.5e-3),
        "ScheduleFreeWrapper(SGD)": lambda m: schedulefree.ScheduleFreeWrapper(
            torch.optim.SGD(m.parameters(), lr=0.05), momentum=0.9
        ),
        "pytorch_optimizer ScheduleFreeAdamW": lambda m: _po().ScheduleFreeAdamW(m.parameters(), lr=2.5e-3),
    }


def _readme_loop(make: Callable[[nn.Module], Any], run_dir: Path | None, steps: int, *, resume: bool = False):
    """schedule_free's README shape: ``optimizer.train()`` at the top of training (here after the Guard's line, so
    after a resume), ``optimizer.eval()`` at the end; ``run_dir=None``: the bare loop."""
    model = _model()
    optimizer = make(model)
    config = keel.RecoveryConfig(snapshot_every=5, disk_every=1)
    guard = (
        None if run_dir is None else keel.Guard(model, optimizer, run_dir=str(run_dir), resume=resume, recovery=config)
    )
    try:
        optimizer.train()
        for i in range(guard.global_step if guard else 0, steps):
            x, y = _batch(i)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss) if guard else optimizer.step()
            optimizer.zero_grad()
    finally:
        if guard is not None:
            guard.close()
    optimizer.eval()
    return model


@pytest.mark.parametrize(
    "name",
    [
        "AdamWScheduleFree",
        "ScheduleFreeWrapper(SGD)",
        pytest.param("pytorch_optimizer ScheduleFreeAdamW", marks=pytest.mark.slow),
    ],
)
def test_a_schedule_free_run_resumed_from_disk_ends_on_the_uninterrupted_runs_weights(name: str, tmp_path: Path):
    # ScheduleFreeWrapper keeps its mode on the object, outside its state_dict: resumed into a new wrapper (eval
    # mode) the loop's optimizer.train() moved the restored training point y as if it were the average x, and the
    # run went on from other weights (h30-A F7); the snapshot now holds the mode and the resume gives it back
    make = _schedule_free_makers()[name]
    _readme_loop(make, tmp_path, 12)
    resumed = _readme_loop(make, tmp_path, 20, resume=True)
    bare = _readme_loop(make, None, 20)
    assert _differences([p.detach() for p in resumed.parameters()], [p.detach() for p in bare.parameters()]) == []


def test_which_optimizers_move_their_parameters_outside_step() -> None:
    from keel.recover.schedule_free import swaps_weights

    makers = _schedule_free_makers()
    model = _model()
    adamw = torch.optim.AdamW(model.parameters())
    assert swaps_weights(makers["AdamWScheduleFree"](model))
    assert swaps_weights(makers["ScheduleFreeWrapper(SGD)"](model))  # (pytorch_optimizer's: its resume test, slow)
    assert not swaps_weights(adamw)
    assert swaps_weights(keel.Optimizers(adamw, makers["AdamWScheduleFree"](nn.Linear(2, 2))))
    assert not swaps_weights(keel.Optimizers(adamw, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)))


@pytest.mark.parametrize(
    ("modes", "expected"),
    [
        (None, False),  # a snapshot from before keel held the mode: the wrapper's stays
        ([], False),
        ([True], True),
        ([True, False], True),  # more than there are parts: the extra one is ignored
        (["yes"], False),  # not a bool (a hand-edited meta.json): ignored
        ([1], False),
        ([None], False),
    ],
)
def test_a_snapshots_object_mode_is_given_back_only_as_a_bool(modes: Any, expected: bool) -> None:
    from keel.recover.schedule_free import object_modes, set_object_modes

    wrapper = _schedule_free_makers()["ScheduleFreeWrapper(SGD)"](_model())
    assert object_modes(wrapper) == [False]
    set_object_modes(wrapper, modes)
    assert wrapper.train_mode is expected
    adamw = torch.optim.AdamW(_model().parameters())
    assert object_modes(adamw) is None
    set_object_modes(adamw, [True])
    assert not hasattr(adamw, "train_mode")  # an optimizer without a mode gets none


_GROUP = st.dictionaries(
    st.sampled_from(["lr", "train_mode", "betas", "k"]), st.one_of(st.booleans(), st.floats(allow_nan=False))
)


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(_GROUP, max_size=4), taken=st.lists(_GROUP, max_size=4))
def test_a_completed_snapshot_keeps_the_mode_its_parameters_were_copied_in(groups, taken) -> None:
    from keel.recover.schedule_free import groups_in_mode_of

    merged = groups_in_mode_of(copy.deepcopy(groups), taken)
    assert len(merged) == len(groups)  # every group read now, none dropped or added
    for i, (group, now) in enumerate(zip(merged, groups, strict=True)):
        mode_taken = i < len(taken) and "train_mode" in taken[i] and "train_mode" in now
        assert group == ({**now, "train_mode": taken[i]["train_mode"]} if mode_taken else now)


# --- resuming a Muon + AdamW run: the parts of keel.Optimizers are part of the setup -------------------------------
def _muon_recipe(model: nn.Module, order: str = "muon,adamw", muon: type | None = None) -> keel.Optimizers:
    mats, rest = _matrices_and_rest(model)
    first = (muon or torch.optim.Muon)(mats, lr=0.02)
    parts = {"muon": first, "adamw": torch.optim.AdamW(rest, lr=1e-3)}
    return keel.Optimizers(*(parts[name] for name in order.split(",")))


def _train(model: nn.Module, optimizer: Any, run_dir: Path, *, resume: bool) -> int:
    config = keel.RecoveryConfig(snapshot_every=3, disk_every=1)
    with keel.Guard(model, optimizer, run_dir=str(run_dir), policy="recover", resume=resume, recovery=config) as g:
        for i in range(g.global_step, g.global_step + 4):
            x, y = _batch(i)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            g.step(loss)
            optimizer.zero_grad()
        return g.global_step


@pytest.mark.parametrize(
    ("order", "muon", "named"),
    [
        ("adamw,muon", None, "Optimizers(torch.optim.adamw.AdamW, torch.optim.Muon) now"),
        ("muon,adamw", torch.optim.SGD, "Optimizers(torch.optim.sgd.SGD, torch.optim.adamw.AdamW) now"),
    ],
)
def test_a_muon_recipe_resumed_with_its_parts_in_another_order_or_class_is_refused(order, muon, named, tmp_path):
    # Optimizers' state_dict numbers the parameters on across its parts; the snapshot recorded only the class
    # "Optimizers", so the resume loaded AdamW's state into Muon and its first step raised KeyError: 'step'
    # (SGD for Muon: KeyError: 'dampening') from deep inside torch (h30-A F8)
    _train(_model(), _muon_recipe(_model()), tmp_path, resume=False)
    model = _model()
    with pytest.raises(ValueError, match="another setup") as refused:
        _train(model, _muon_recipe(model, order, muon), tmp_path, resume=True)
    assert "Optimizers(torch.optim.Muon, torch.optim.adamw.AdamW) in the snapshot" in str(refused.value)
    assert named in str(refused.value)
    model = _model()
    assert _train(model, _muon_recipe(model), tmp_path, resume=True) > 4  # the same parts resume


@pytest.mark.parametrize(
    ("saved", "now", "fits"),
    [
        ("keel.guard.optimizers.Optimizers", "keel.guard.optimizers.Optimizers(a.A, b.B)", True),  # older keel
        ("keel.guard.optimizers.Optimizers(a.A, b.B)", "keel.guard.optimizers.Optimizers(a.A, b.B)", True),
        ("keel.guard.optimizers.Optimizers(b.B, a.A)", "keel.guard.optimizers.Optimizers(a.A, b.B)", False),
        ("keel.guard.optimizers.Optimizers(a.A, b.B)", "keel.guard.optimizers.Optimizers", False),
        ("keel.guard.optimizers.Schedulers", "keel.guard.optimizers.Schedulers(a.A)", True),
        ("torch.optim.adamw.AdamW", "torch.optim.adamw.AdamW(x)", False),  # the older form of a group only
        ("keel.guard.optimizers.Optimizers", "keel.guard.optimizers.OptimizersX(a.A)", False),
        (None, "torch.optim.adamw.AdamW", False),
        (None, None, True),
        (3, "3(x)", False),  # a hand-edited meta.json
        ("", "(x)", False),
        (["keel.guard.optimizers.Optimizers"], "keel.guard.optimizers.Optimizers(a.A)", False),
    ],
)
def test_which_recorded_optimizer_classes_fit(saved: Any, now: Any, fits: bool) -> None:
    from keel.recover.compat import _same_class

    assert _same_class(saved, now) is fits


def test_a_snapshot_completed_after_the_loops_optimizer_eval_holds_the_training_mode(tmp_path: Path) -> None:
    # keel.watch with the loop's warm-up scheduler completes each snapshot at keel's next call, re-reading the groups
    # for the scheduler's call: at close() after the README's final optimizer.eval() that read train_mode=False,
    # beside parameters copied in training mode; resumed, optimizer.train() did nothing and the run went on from
    # other weights (h30-A F1)
    schedulefree = pytest.importorskip("schedulefree")

    def loop(run_dir: Path | None, steps: int, resume: bool = False) -> nn.Module:
        model = _model()
        optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=2.5e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
        config = keel.RecoveryConfig(snapshot_every=5, disk_every=1)
        guard = None
        if run_dir is not None:
            guard = keel.watch(model, optimizer, scheduler, run_dir=str(run_dir), resume=resume, recovery=config)
        optimizer.train()
        for i in range(guard.global_step if guard else 0, steps):
            x, y = _batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        optimizer.eval()  # evaluate (and save), as the README does, then the run ends
        if guard is not None:
            guard.close()
        return model

    loop(tmp_path, 10)
    resumed, bare = loop(tmp_path, 15, resume=True), loop(None, 15)
    assert _differences([p.detach() for p in resumed.parameters()], [p.detach() for p in bare.parameters()]) == []


def test_a_schedule_free_snapshot_is_copied_before_keel_returns(tmp_path: Path) -> None:
    # the ring copies in the background until the next optimizer.step(); the loop's optimizer.eval() moves the
    # parameters before that, and the copy took some tensors at y, some at x, one torn (h30-A F2, 1 run in 3)
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1))  # above the ring's inline size
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    optimizer.train()
    config = keel.RecoveryConfig(snapshot_every=2, copy_in_background=True)
    with keel.Guard(model, optimizer, run_dir=str(tmp_path), policy="recover", recovery=config) as guard:
        taken = 0
        for _ in range(6):
            loss = model(torch.randn(16, 64)).square().mean()
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad()
            newest = guard.recovery.ring.snapshots[-1]
            if newest.step != guard.global_step:
                continue  # no snapshot after this update
            taken += 1
            assert newest.ready.is_set()  # complete before the loop can call optimizer.eval()
            held = {k: t for k, t in newest.tensors.items() if k.startswith("model/")}
            assert all(torch.equal(held[f"model/{n}"], p) for n, p in model.named_parameters())
        assert taken >= 2


class _ModeLike:
    """Optimizer-likes with train()/eval() methods, as a loop may pass (a model-like mix-up, a wrapper)."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)

    def train(self) -> None: ...

    def eval(self) -> None: ...


@pytest.mark.parametrize(
    ("obj", "swaps"),
    [
        (_ModeLike(), False),  # no groups at all
        (_ModeLike(param_groups=[{"lr": 0.1}]), False),
        (_ModeLike(param_groups=[{"lr": 0.1, "train_mode": True}]), True),
        (_ModeLike(param_groups=[["train_mode"]]), False),  # a group that is not a dict
        (_ModeLike(train_mode=False), True),  # the mode on the object (ScheduleFreeWrapper)
        (_ModeLike(train_mode="yes"), False),
        (nn.Linear(2, 2), False),  # a module: train()/eval(), a bool `training`, no train_mode
    ],
)
def test_which_objects_count_as_schedule_free(obj: Any, swaps: bool) -> None:
    from keel.recover.schedule_free import swaps_weights

    assert swaps_weights(obj) is swaps
