"""Under ``recover``, the weights are read after the updates keel cannot prove finite, the first one and each one a
snapshot follows (`keel.guard.weights_check.update_proven_finite`, ``RecoveryConfig(check_weights=...)``).

The proof is attacked here the way a run could break it: extreme finite gradients (up to where their squares
overflow float32, down to subnormals), settings at the proof's bounds, float32/bfloat16/float64 weights, every
torch.optim code path (for-loop and foreach, amsgrad, maximize, nesterov).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import keel
import keel.guard.guard as guard_module
from keel.guard.weights_check import MAX_LR, MIN_BETA2, MIN_EPS, update_proven_finite
from keel.recover.recovery import Recovery
from keel.signals.norms import global_norm, per_tensor_norms
from tests.guard.test_deferred import HostReads

F32 = {torch.float32}


def _adamw(**kw):
    return torch.optim.AdamW([nn.Parameter(torch.ones(3))], **kw)


def _sgd(**kw):
    return torch.optim.SGD([nn.Parameter(torch.ones(3))], **kw)


class _MyAdam(torch.optim.Adam):
    pass


# (what, optimizer, dtypes, LR scales, proven)
TABLE = [
    ("AdamW defaults", lambda: _adamw(), F32, [1.0], True),
    ("Adam defaults", lambda: torch.optim.Adam([nn.Parameter(torch.ones(3))]), F32, [1.0], True),
    ("SGD momentum nesterov", lambda: _sgd(lr=0.1, momentum=0.9, nesterov=True), F32, [1.0], True),
    ("bfloat16 and float64 weights", lambda: _adamw(), {torch.bfloat16, torch.float64}, [1.0], True),
    ("float16 weights", lambda: _adamw(), {torch.float16, torch.float32}, [1.0], False),
    ("a subclass", lambda: _MyAdam([nn.Parameter(torch.ones(3))]), F32, [1.0], False),
    ("another optimizer", lambda: torch.optim.RMSprop([nn.Parameter(torch.ones(3))]), F32, [1.0], False),
    ("LR at the bound", lambda: _adamw(lr=MAX_LR, weight_decay=0.0), F32, [1.0], True),
    ("LR past the bound", lambda: _adamw(lr=MAX_LR * 2, weight_decay=0.0), F32, [1.0], False),
    ("LR scaled back under it", lambda: _adamw(lr=MAX_LR * 2, weight_decay=0.0), F32, [0.1], True),
    ("LR inf", lambda: _adamw(lr=math.inf), F32, [1.0], False),
    ("LR nan", lambda: _set(_adamw(), lr=math.nan), F32, [1.0], False),
    ("LR scale nan", lambda: _adamw(), F32, [math.nan], False),
    ("a tensor LR", lambda: _adamw(lr=torch.tensor(1e-3)), F32, [1.0], True),
    ("eps at the bound", lambda: _adamw(eps=MIN_EPS), F32, [1.0], True),
    ("eps under it", lambda: _adamw(eps=MIN_EPS / 10), F32, [1.0], False),
    ("eps 0", lambda: _adamw(eps=0.0), F32, [1.0], False),
    ("beta1 squared above beta2", lambda: _adamw(betas=(0.95, 0.9)), F32, [1.0], False),
    ("beta2 0", lambda: _adamw(betas=(0.0, 0.0)), F32, [1.0], False),
    ("beta2 at its bound", lambda: _adamw(betas=(0.0, MIN_BETA2)), F32, [1.0], True),
    ("decay 1, LR 1", lambda: _adamw(lr=1.0, weight_decay=1.0), F32, [1.0], True),
    ("decay times LR above 1", lambda: _adamw(lr=2.0, weight_decay=1.0), F32, [1.0], False),
    ("decay above 1", lambda: _sgd(lr=1e-3, weight_decay=2.0), F32, [1.0], False),
    ("SGD momentum at its bound", lambda: _sgd(lr=0.1, momentum=0.999), F32, [1.0], True),
    ("SGD momentum past it", lambda: _sgd(lr=0.1, momentum=0.9999), F32, [1.0], False),
    ("one scale for two groups", lambda: _two_groups(), F32, [1.0], False),
    ("two groups", lambda: _two_groups(), F32, [1.0, 0.5], True),
]


def _set(opt, **group):
    opt.param_groups[0].update(group)  # past the constructor's checks, as a scheduler or a loop may write
    return opt


def _two_groups():
    return torch.optim.AdamW([{"params": [nn.Parameter(torch.ones(2))]}, {"params": [nn.Parameter(torch.ones(2))]}])


@pytest.mark.parametrize(("optimizer", "dtypes", "scales", "proven"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_which_updates_are_proven(optimizer, dtypes, scales, proven):
    assert update_proven_finite(optimizer(), dtypes, scales) is proven


def test_the_settings_a_loop_changes_after_construction_are_judged_each_time():
    opt = _adamw()
    assert update_proven_finite(opt, F32, [1.0])
    opt.param_groups[0]["lr"] = math.inf  # a scheduler gone wrong
    assert not update_proven_finite(opt, F32, [1.0])
    opt.param_groups[0]["lr"], opt.param_groups[0]["betas"] = 1e-3, (0.9, 1.0)
    assert not update_proven_finite(opt, F32, [1.0])


def test_step_hooks_anywhere_make_an_update_unproven():
    opt = _adamw()
    handle = opt.register_step_post_hook(lambda *_: None)
    assert not update_proven_finite(opt, F32, [1.0])
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *_: None)
    try:
        assert not update_proven_finite(opt, F32, [1.0])
    finally:
        handle.remove()
    assert update_proven_finite(opt, F32, [1.0])


def _magnitude(exponent: int, sign: bool) -> float:
    return (-1.0 if sign else 1.0) * 10.0**exponent


_values = st.lists(st.builds(_magnitude, st.integers(-45, 19), st.booleans()) | st.just(0.0), min_size=4, max_size=4)


@st.composite
def _settings(draw):
    kind = draw(st.sampled_from(["adam", "adamw", "sgd"]))
    lr = 10.0 ** draw(st.integers(-8, int(math.log10(MAX_LR))))
    decay = draw(st.sampled_from([0.0, 1e-2, 1.0])) * min(1.0, 1.0 / lr)
    common = {"lr": lr, "weight_decay": decay, "foreach": draw(st.booleans()), "maximize": draw(st.booleans())}
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9, 0.999]))
        nesterov = momentum > 0 and draw(st.booleans())
        return kind, {**common, "momentum": momentum, "nesterov": nesterov}
    beta1 = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
    beta2 = max(beta1 * beta1, MIN_BETA2, draw(st.sampled_from([0.0, 0.5, 0.95, 0.999, 1 - 1e-7])))
    eps = 10.0 ** draw(st.integers(int(math.log10(MIN_EPS)), 0))
    return kind, {**common, "betas": (beta1, beta2), "eps": eps, "amsgrad": draw(st.booleans())}


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@settings(max_examples=300, deadline=None)
@example(  # h30-A's F6: v = Inf from the square of g + λθ, then β₂ = 0 made it NaN (β₂ ≥ MIN_BETA2 now)
    setup=(
        "adam",
        {
            "lr": 1.0,
            "weight_decay": 0.01,
            "foreach": False,
            "maximize": False,
            "betas": (0.0, MIN_BETA2),
            "eps": 1.0,
            "amsgrad": False,
        },
    ),
    weights=[1.0, 1.0, 1.0, 1e22],
    grads=[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]],
    dtype=torch.float32,
)
@given(
    setup=_settings(),
    weights=st.lists(st.builds(_magnitude, st.integers(-45, 30), st.booleans()), min_size=4, max_size=4),
    grads=st.lists(_values, min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_a_proven_update_of_finite_gradients_leaves_finite_weights(setup, weights, grads, dtype):
    """The proof's claim, attacked: whenever keel would not read the weights (its gradient norm finite, the update
    proven), they are finite after ``optimizer.step()`` — over several steps of extreme gradients."""
    kind, kw = setup
    param = nn.Parameter(torch.tensor(weights, dtype=dtype))
    opt = OPTIMIZERS[kind]([param], **kw)
    assert update_proven_finite(opt, {dtype}, [1.0])  # the strategy stays inside the bounds
    for g in grads:
        param.grad = torch.tensor(g, dtype=dtype)
        if not math.isfinite(float(global_norm(per_tensor_norms([param.grad])))):
            continue  # keel skips such a step: no update is applied
        opt.step()
        assert torch.isfinite(param).all(), (kind, kw, weights, grads)


# --- in a Guard ----------------------------------------------------------------------------------------------------


def _train(optimizer_of, *, steps=12, write_nan_at=None, spikes=(), **recovery):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))
    opt = optimizer_of(model.parameters())
    config = keel.RecoveryConfig(snapshot_every=5, **recovery)
    guard = keel.Guard(model, opt, policy="recover", recovery=config)
    read_at: list[int] = []
    real = guard_module.non_finite_parameters

    def spy(names, params, ranks):
        read_at.append(guard.global_step)
        return real(names, params, ranks)

    guard_module.non_finite_parameters = spy
    try:
        for step in range(steps):
            x = torch.randint(0, 5, (8, 2))  # rows 5-9 of the embedding are never used
            loss = model(x).square().mean() * (50.0 if step in spikes else 1.0)
            loss.backward()
            if step == write_nan_at:
                with torch.no_grad():
                    model[0].weight[9] = math.nan  # an unused row: the loss and gradients stay finite
            guard.step(loss)
            opt.zero_grad()
    finally:
        guard_module.non_finite_parameters = real
        guard.close()
    return guard, read_at


def test_a_healthy_adamw_run_reads_its_weights_after_the_first_update_and_before_each_snapshot():
    guard, read_at = _train(lambda p: torch.optim.AdamW(p, lr=1e-3))
    assert read_at == [0, 4, 9]  # snapshots of the state at the start of steps 5 and 10
    assert guard.decisions == []


@pytest.mark.parametrize(
    "optimizer_of",
    [
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
        lambda p: keel.optim.SPAM(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.95, 0.9)),
    ],
    ids=["RMSprop", "keel SPAM", "beta1 squared above beta2"],
)
def test_unproven_updates_are_read_every_step(optimizer_of):
    _, read_at = _train(optimizer_of)
    assert read_at == list(range(12))


def test_every_update_reads_every_step():
    _, read_at = _train(lambda p: torch.optim.AdamW(p, lr=1e-3), check_weights="every_update")
    assert read_at == list(range(12))


@pytest.mark.parametrize(("check", "rolled_back_at"), [("unproven", 9), ("every_update", 6)])
def test_a_nan_the_loop_writes_into_an_unused_weight_never_reaches_a_snapshot(check, rolled_back_at):
    """What ``"unproven"`` gives up, and what it keeps: the NaN written after step 6's backward is found before the
    next snapshot (of step 10's start), not right after step 6's update; every snapshot holds finite weights."""
    guard, _ = _train(lambda p: torch.optim.AdamW(p, lr=1e-3), write_nan_at=6, check_weights=check)
    (rollback,) = guard.decisions
    assert (rollback.step, rollback.action) == (rolled_back_at, "rollback")
    (finding,) = [f for f in rollback.findings if f.evidence.get("after_update")]
    assert finding.evidence["parameters"] == ["0.weight"]
    assert all(bool(torch.isfinite(p).all()) for p in guard.model.parameters())
    assert rollback.restored_step is not None and rollback.restored_step <= 6


@settings(max_examples=12, deadline=None)
@given(spikes=st.sets(st.integers(1, 29), max_size=6))
def test_every_snapshot_after_an_update_follows_a_read_of_its_weights(spikes):
    """`Recovery.due_after` agrees with the snapshot `after_step` then takes, whatever warnings and critical findings
    (which change the schedule) the step had."""
    taken: list[int] = []
    real_after_step = Recovery.after_step

    def after_step(self, steps_done):
        snap = real_after_step(self, steps_done)
        if snap is not None:
            taken.append(steps_done)
        return snap

    Recovery.after_step = after_step  # type: ignore[method-assign]
    try:
        guard, read_at = _train(lambda p: torch.optim.AdamW(p, lr=1e-2), steps=30, spikes=spikes, quiet_steps=1)
    finally:
        Recovery.after_step = real_after_step  # type: ignore[method-assign]
    after_updates = [s for s in taken if s > 0]  # (the first one holds the state the loop began with)
    assert after_updates, "no snapshot was taken after an update"
    assert {s - 1 for s in after_updates} <= set(read_at)


def test_a_healthy_recover_step_reads_to_the_host_as_often_as_skip_between_snapshots(monkeypatch):
    """Issue 13's count of host syncs on the step path: the weights check was a second device→host read on every
    step under ``recover``; an update proven finite needs none, so between snapshots recover reads what skip does."""
    per_policy = {}
    for policy in ("skip", "recover"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        recovery = keel.RecoveryConfig(snapshot_every=5) if policy == "recover" else None
        guard = keel.Guard(model, opt, policy=policy, recovery=recovery)
        reads = HostReads(monkeypatch)
        counts = []
        for _ in range(12):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            before = reads.count
            guard.step(loss)
            counts.append(reads.count - before)
            opt.zero_grad()
        monkeypatch.undo()
        guard.close()
        per_policy[policy] = counts
    skip, recover = per_policy["skip"], per_policy["recover"]
    read_after = {0, 4, 9}  # the first update and those snapshots follow: one read more each
    assert [r - s for r, s in zip(recover, skip, strict=True)] == [int(i in read_after) for i in range(12)]


class _DecayGlitch(torch.optim.lr_scheduler.LambdaLR):
    """A scheduler that also writes each group's weight decay: NaN for the update of step ``at`` only (no detector
    reads the weight decay; a NaN or Inf learning rate is an lr_surge, skipped before it is applied)."""

    def __init__(self, optimizer: torch.optim.Optimizer, at: int) -> None:
        self.at = at
        super().__init__(optimizer, lambda _: 1.0)

    def step(self, epoch=None) -> None:
        super().step(epoch)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = math.nan if self.last_epoch == self.at else 0.01


def test_an_update_at_the_settings_a_scheduler_the_guard_steps_wrote_is_judged_on_them_and_rolled_back(tmp_path):
    # The Guard steps its scheduler inside the update's call; the proof read the groups after that, so it judged the
    # next update's settings (finite again) and vouched for an update made with NaN in them: NaN weights reached the
    # next forward (h30-A F5, found with a LambdaLR returning inf for one step).
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    glitch_at = 6
    actions = []
    with keel.Guard(
        model, optimizer, _DecayGlitch(optimizer, glitch_at), run_dir=str(tmp_path), policy="recover"
    ) as guard:
        for _ in range(glitch_at + 1):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            actions.append(guard.step(loss).action)
            optimizer.zero_grad()
            assert all(torch.isfinite(p).all() for p in model.parameters())  # the loop never sees them broken
    assert actions == ["ok"] * glitch_at + ["rollback"]


def test_a_proof_that_raises_is_recorded_once_and_every_update_is_read_from_then_on(monkeypatch):
    """keel's own failure never stops the run: the proof is switched off and the weights check stays on."""

    def broken(*_):
        raise KeyError("eps")

    monkeypatch.setattr(guard_module, "update_proven_finite", broken)
    guard, read_at = _train(lambda p: torch.optim.AdamW(p, lr=1e-3))
    assert read_at == list(range(12)) and guard.global_step == 12
    (error,) = [f for f in guard.findings if f.kind == "keel_error"]
    assert "weights proof" in error.cause and "KeyError" in error.cause


@pytest.mark.parametrize("setting", ["deferred", "scaler"])
def test_every_update_where_no_update_is_read_is_said_at_construction(setting):
    """``check_weights="every_update"`` asks for a read that ``sync="deferred"`` and an enabled GradScaler never make
    (helper E's F3): one KeelWarning naming both; the default setting says nothing."""
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    kwargs = {"sync": "deferred"} if setting == "deferred" else {"scaler": torch.amp.GradScaler("cpu")}
    every = keel.RecoveryConfig(check_weights="every_update")
    with pytest.warns(keel.KeelWarning, match="check_weights='every_update'.*no update's weights are read"):
        keel.Guard(model, opt, policy="recover", recovery=every, **kwargs).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", keel.KeelWarning)
        keel.Guard(model, opt, policy="recover", **kwargs).close()
