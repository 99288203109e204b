"""``RecoveryConfig(check_weights="unproven")`` (the default) through the ways a user drives keel: `keel.watch` with
the loop's own scheduler, gradient accumulation and keel's clipping, a tracked EMA, disk snapshots, the Lightning
and Hugging Face callbacks, and a loop that changes the optimizer or the weights' dtype mid-run.

The fault throughout is the one the default gives up on catching at once (docs/recovery.md, "Weights read after an
update"): the loop writes NaN into an embedding row no batch uses, between its backward and the update, so the loss
and the gradients stay finite. What must hold, in each setting, against ``check_weights="every_update"``:
the weights are read after the first update and after each update a snapshot follows (only there, for AdamW);
no snapshot, in memory or on disk, ever holds the NaN; the rollback restores finite weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import keel
import keel.guard.guard as guard_module
from keel.recover.disk import DiskSnapshots
from keel.recover.snapshot import SnapshotRing

WRITE_AT = 6  # the loop writes the NaN after this step's backward
STEPS = 14
SNAPSHOT_EVERY = 5
# unproven: read after the first update, before the snapshots of steps 5 and 10, and after the first update from the
# snapshot the rollback at 9 restored; every_update: after all of them
READS = {"unproven": [0, 4, 9, 10], "every_update": list(range(STEPS))}
# unproven finds the NaN before the snapshot of step 10's start (after update 9), every_update right after update 6
ROLLED_BACK_AT = {"unproven": 9, "every_update": WRITE_AT}


class Watched:
    """The steps whose weights the Guard read, and every snapshot taken (copy finished) that holds NaN/Inf."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step = 0
        self.reads: list[int] = []
        self.broken_snapshots: list[tuple[int, list[str]]] = []
        read, take = guard_module.non_finite_parameters, SnapshotRing.take

        def reading(names, params, ranks):
            self.reads.append(self.step)
            return read(names, params, ranks)

        def taking(ring, step, state):
            snap = take(ring, step, state)
            ring.fence()
            self.broken_snapshots += [(step, k) for k in _non_finite(snap.tensors)]
            return snap

        monkeypatch.setattr(guard_module, "non_finite_parameters", reading)
        monkeypatch.setattr(SnapshotRing, "take", taking)


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _broken_on_disk(run_dir: Path) -> list[tuple[int, list[str]]]:
    found = []
    folders = [d for d in run_dir.rglob("snapshots/*") if d.is_dir()]
    assert folders, f"no disk snapshot under {run_dir}"
    for folder in folders:
        snap = DiskSnapshots.load(folder)
        if _non_finite(snap.tensors):
            found.append((snap.step, _non_finite(snap.tensors)))
    return found


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 5, (8, 2), generator=torch.Generator().manual_seed(step))  # rows 5-9 are never used


def _write_nan(embedding: nn.Embedding) -> None:
    with torch.no_grad():
        embedding.weight[9] = math.nan


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _recovery(check: str, **extra) -> keel.RecoveryConfig:
    return keel.RecoveryConfig(snapshot_every=SNAPSHOT_EVERY, check_weights=check, **extra)  # type: ignore[arg-type]


LOOPS = [
    ("plain", "unproven"),
    ("plain", "every_update"),
    ("ema", "unproven"),
    pytest.param("ema", "every_update", marks=pytest.mark.slow),
    ("accumulation and keel's clipping", "unproven"),
    pytest.param("accumulation and keel's clipping", "every_update", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("loop", "check"), LOOPS)
def test_keel_watch_with_the_loops_scheduler_keeps_every_snapshot_finite(tmp_path, monkeypatch, check, loop):
    """The loop steps its own LambdaLR (keel completes the snapshot at its next call), optionally updates a tracked
    EMA after each update, or accumulates two micro-batches under keel's ``max_grad_norm``."""
    watched = Watched(monkeypatch)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    clip = {"max_grad_norm": 1.0} if loop.startswith("accumulation") else {}
    micro = 2 if clip else 1
    on_disk = loop == "plain"  # (disk snapshots cost a write a step: one setting is enough)
    disk = {"run_dir": str(tmp_path), "recovery": _recovery(check, disk_every=1)} if on_disk else {}
    watch = keel.watch(model, opt, sched, policy="recover", **{"recovery": _recovery(check), **disk, **clip})
    ema = None
    try:
        if loop == "ema":
            ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
            )
            watch.guard.track(ema, name="ema")
        for step in range(STEPS):
            for m in range(micro):
                (model(_ids(10 * step + m)).square().mean() / micro).backward()
            if step == WRITE_AT:
                _write_nan(model[0])
            watched.step = watch.guard.global_step
            opt.step()
            sched.step()
            opt.zero_grad()
            if ema is not None:
                ema.update_parameters(model)
        decisions = [(d.step, d.action) for d in watch.guard.decisions]
    finally:
        watch.close()
    assert watched.reads == READS[check]
    assert decisions == [(ROLLED_BACK_AT[check], "rollback")]
    assert watched.broken_snapshots == [] and (not on_disk or _broken_on_disk(tmp_path) == [])
    assert _finite(model) and (ema is None or _finite(ema))


def _halve(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.half()  # the same Parameter objects, float16 from now on: outside the proof


def _add_group(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "lr": 1e-3})  # (no gradient: Adam leaves it)


def _tensor_lr(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))


# (what changes at step 3, the optimizer, the steps whose weights "unproven" reads)
MID_RUN = [
    ("model.half()", _halve, lambda p: torch.optim.SGD(p, lr=1e-2), [0, *range(3, STEPS)]),
    ("add_param_group", _add_group, lambda p: torch.optim.AdamW(p, lr=1e-2), READS["unproven"]),
    ("a tensor LR", _tensor_lr, lambda p: torch.optim.AdamW(p, lr=1e-2), READS["unproven"]),
    ("fused AdamW", lambda *_: None, lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True), READS["unproven"]),
]


@pytest.mark.parametrize(("change", "optimizer_of", "reads"), [m[1:] for m in MID_RUN], ids=[m[0] for m in MID_RUN])
def test_what_the_loop_changes_mid_run_is_judged_at_each_update(monkeypatch, change, optimizer_of, reads):
    """float16 weights from ``model.half()`` after the Guard was made are read after every update from then on; a
    group added mid-run, an LR written as a tensor and the fused kernel stay proven; each way the NaN is rolled back
    and no snapshot holds it."""
    watched = Watched(monkeypatch)
    model = _model()
    opt = optimizer_of(model.parameters())
    with keel.Guard(model, opt, policy="recover", recovery=_recovery("unproven")) as guard:
        for step in range(STEPS):
            if step == 3:
                change(model, opt)
            loss = model(_ids(step)).float().square().mean()
            loss.backward()
            if step == WRITE_AT:
                _write_nan(model[0])
            watched.step = guard.global_step
            guard.step(loss)
            opt.zero_grad()
    assert watched.reads == reads
    assert [d.action for d in guard.decisions] == ["rollback"]
    assert watched.broken_snapshots == [] and _finite(model)


@pytest.mark.parametrize("check", ["unproven", "every_update"])
def test_an_optimizer_state_the_loop_loads_mid_run_makes_the_next_update_read(monkeypatch, check):
    """The loop loads an optimizer checkpoint mid-run ("back to the best checkpoint") whose Adam state holds a NaN in
    a row no batch uses: AdamW, proven, writes NaN from finite gradients on finite weights. The update after the load
    is read, as the first one is: rolled back at that step (before: at the next snapshot's read, step 9). keel's
    hook on the optimizer is gone after close."""
    watched = Watched(monkeypatch)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with keel.Guard(model, opt, policy="recover", recovery=_recovery(check)) as guard:
        for step in range(STEPS):
            if step == WRITE_AT:
                checkpoint = opt.state_dict()
                checkpoint["state"][0]["exp_avg_sq"] = checkpoint["state"][0]["exp_avg_sq"].clone()
                checkpoint["state"][0]["exp_avg_sq"][9, 0] = math.nan
                opt.load_state_dict(checkpoint)
            loss = model(_ids(step)).square().mean()
            loss.backward()
            watched.step = guard.global_step
            guard.step(loss)
            opt.zero_grad()
    assert [(d.step, d.action) for d in guard.decisions] == [(WRITE_AT, "rollback")]
    assert watched.broken_snapshots == [] and _finite(model)
    assert not opt._optimizer_load_state_dict_post_hooks


@pytest.mark.slow
@pytest.mark.parametrize("check", ["unproven", "every_update"])
def test_the_hf_trainer_callback_proves_the_inner_adamw_and_keeps_every_snapshot_finite(tmp_path, monkeypatch, check):
    """``KeelCallback`` gives the Guard the AdamW inside accelerate's AcceleratedOptimizer (proven), under gradient
    accumulation and the Trainer's warmup schedule; the NaN is written in ``on_pre_optimizer_step``."""
    transformers = pytest.importorskip("transformers")
    from keel.integrations.hf import KeelCallback
    from tests.tiny_hf import tiny_llama

    watched = Watched(monkeypatch)

    class Write(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            watched.step = state.global_step
            if state.global_step == WRITE_AT:
                _write_nan(model.model.embed_tokens)

    model = tiny_llama()  # untied embeddings: a NaN in a row no batch uses (ids 10-31) leaves the logits finite
    ids = torch.randint(10, 32, (64, 8), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    callback = KeelCallback(run_dir=str(tmp_path / "keel"), policy="recover", recovery=_recovery(check, disk_every=1))
    data = [{"input_ids": x, "labels": x} for x in ids]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[Write(), callback]).train()
    guard = callback.guard
    assert type(guard.optimizer) is torch.optim.AdamW
    assert watched.reads[:3] == READS[check][:3]
    assert [(d.step, d.action) for d in guard.decisions] == [(ROLLED_BACK_AT[check], "rollback")]
    assert watched.broken_snapshots == [] and _broken_on_disk(tmp_path / "keel") == [] and _finite(model)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["unproven", "every_update"])
def test_the_lightning_callback_keeps_every_snapshot_finite(tmp_path, monkeypatch, check):
    """Lightning's automatic optimization with accumulation, clipping and a per-step StepLR; the NaN is written in
    ``on_before_optimizer_step``."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from keel.integrations.lightning import KeelCallback

    watched = Watched(monkeypatch)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def on_before_optimizer_step(self, optimizer):
            watched.step = self.trainer.global_step
            if self.trainer.global_step == WRITE_AT:
                _write_nan(self.net[0])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Module()
    data = DataLoader(TensorDataset(torch.cat([_ids(s) for s in range(2 * STEPS)])), batch_size=8)
    callback = KeelCallback(run_dir=str(tmp_path), policy="recover", recovery=_recovery(check, disk_every=1))
    trainer = L.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, data)
    assert type(callback.guard.optimizer) is torch.optim.AdamW
    assert watched.reads[:3] == READS[check][:3]
    assert [(d.step, d.action) for d in callback.guard.decisions] == [(ROLLED_BACK_AT[check], "rollback")]
    assert watched.broken_snapshots == [] and _broken_on_disk(tmp_path) == [] and _finite(module)


@pytest.mark.parametrize(("check", "rolled_back_at"), [("unproven", WRITE_AT + 1), ("every_update", WRITE_AT)])
def test_a_nan_in_a_used_weight_reaches_one_forward_and_the_rollback_restores_batchnorm_and_the_tracked_ema(
    check, rolled_back_at
):
    """The weight is used: under ``"unproven"`` the next forward runs on it (BatchNorm's running statistics and the
    loop's EMA take the NaN in), its loss is non-finite, and the rollback restores the weights, the statistics and
    the EMA given to ``guard.track``; ``"every_update"`` rolls back before that forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    with keel.Guard(model, opt, policy="recover", recovery=_recovery(check)) as guard:
        guard.track(ema, name="ema")
        for step in range(STEPS):
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            loss = model(x).square().mean()
            loss.backward()
            if step == WRITE_AT:
                with torch.no_grad():
                    model[0].weight[3, 0] = math.nan  # feeds BatchNorm's channel 3
            guard.step(loss)
            opt.zero_grad()
            ema.update_parameters(model)
    assert [(d.step, d.action, d.restored_step) for d in guard.decisions] == [(rolled_back_at, "rollback", 5)]
    stats = (model[1].running_mean, model[1].running_var)
    assert _finite(model) and _finite(ema) and all(bool(torch.isfinite(s).all()) for s in stats)


def _run_with_a_snapshot_holding_the_loops_nan(check: str, *, rows: int = 10, real_race: bool = False) -> keel.Guard:
    """The loop writes NaN into an unused row right after step 4's ``guard.step`` returned, while the snapshot taken
    in that call (of step 5's start) is copied beside it: the copy holds the NaN (h30-E F1). ``real_race``: a real
    background copy of a 64 MB table; else the copy is finished and then given the loop's write, as that copy was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(rows, 4), nn.Flatten(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = keel.Guard(model, opt, policy="recover", recovery=_recovery(check))
    guard.recovery.ring.background = real_race or guard.recovery.ring.background
    with guard:
        for step in range(30):
            loss = model(_ids(step)).square().mean()
            loss.backward()
            guard.step(loss)
            if step == 4:
                with torch.no_grad():
                    model[0].weight[rows - 1] = math.nan
                if not real_race:
                    guard.recovery.ring.fence()
                    guard.recovery.ring.snapshots[-1].tensors["model/0.weight"][rows - 1] = math.nan
            opt.zero_grad()
    return guard


@pytest.mark.parametrize("check", ["unproven", "every_update"])
def test_weights_restored_from_a_snapshot_that_holds_the_loops_nan_are_read_and_an_older_one_restored(check):
    """The weights are read after the first update from a restored snapshot, as after the run's first: one that holds
    NaN is found there and passed over for an older one. Before, under ``"unproven"``, the next update was proven,
    the NaN stayed until the next snapshot's read, an update had run on the restored state by then, and the same
    snapshot was restored again: three rollbacks to step 5, LR × 0.01, abort."""
    guard = _run_with_a_snapshot_holding_the_loops_nan(check)
    restored = [d.restored_step for d in guard.decisions if d.action == "rollback"]
    assert restored == [5, 0] and guard.global_step == 30
    assert _finite(guard.model)


@pytest.mark.slow
def test_a_real_background_copy_that_races_the_loops_write_is_not_restored_for_good():
    guard = _run_with_a_snapshot_holding_the_loops_nan("unproven", rows=4_000_000, real_race=True)
    assert guard.global_step == 30 and _finite(guard.model)


@pytest.mark.parametrize("check", ["unproven", "every_update"])
def test_the_loops_grad_norm_of_a_part_of_the_gradients_proves_nothing(monkeypatch, check):
    """``probes`` without keel's gradient norm, and the loop passing the norm its clipping returned for the head only:
    a NaN gradient elsewhere is applied (keel cannot see it), and AdamW writes NaN into that weight. The proof took the
    loop's finite number for the gradients' and vouched: the NaN stayed in the weights until the read before the next
    snapshot (rolled back at step 9, every_update at 6); now the update is read, as under every_update."""
    watched = Watched(monkeypatch)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with keel.Guard(model, opt, policy="recover", probes=["loss"], recovery=_recovery(check)) as guard:
        for step in range(STEPS):
            loss = model(_ids(step)).square().mean()
            loss.backward()
            if step == WRITE_AT:
                model[0].weight.grad[9, 0] = math.nan  # a row no batch uses: the loss stays finite
            head_norm = torch.nn.utils.clip_grad_norm_(model[2].parameters(), 1.0)
            watched.step = guard.global_step
            guard.step(loss, grad_norm=head_norm)
            opt.zero_grad()
    assert [(d.step, d.action) for d in guard.decisions] == [(WRITE_AT, "rollback")]
    assert watched.broken_snapshots == [] and _finite(model)
