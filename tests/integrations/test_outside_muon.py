"""keel.watch on the Muon loops of karpathy/nanochat (``scripts/base_train.py``) and KellerJordan/modded-nanogpt
(``train_gpt.py``), as a user adds it: ``torch.optim.Muon`` on the hidden matrices and AdamW on the embedding and
head, both stepped at each update (``for opt in optimizers: opt.step()``), the LR of every group and Muon's momentum
written by hand each step, bf16 autocast on CPU, gradient accumulation, no GradScaler,
``model.zero_grad(set_to_none=True)``, a GPT with QK-norm, relu² and logits soft-capped as ``15 * tanh(x / 15)`` that
returns its loss bare (``loss = model(x, y)``). The text is Python's own source as bytes."""

from __future__ import annotations

import sqlite3
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel._core.errors import TrainingAborted

WIDTH, HEADS, BLOCK, BATCH = 16, 2, 8, 4


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(_norm(x)).view(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(_norm(q), _norm(k), v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.relu(self.fc(_norm(x))).square())


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.lm_head = nn.Embedding(256, WIDTH), nn.Linear(WIDTH, 256, bias=False)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = _norm(self.wte(idx))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(_norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)  # soft-capping
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _tokens() -> torch.Tensor:
    source = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_bytes()[:6000]
    return torch.tensor(list(source), dtype=torch.long)


def _batches(steps: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens, g = _tokens(), torch.Generator().manual_seed(1)
    starts = torch.randint(len(tokens) - BLOCK - 1, (steps * accum, BATCH), generator=g)
    return [
        (torch.stack([tokens[s : s + BLOCK] for s in row]), torch.stack([tokens[s + 1 : s + BLOCK + 1] for s in row]))
        for row in starts
    ]


def _optimizers(model: GPT) -> list[torch.optim.Optimizer]:
    """modded-nanogpt's split: Muon for the blocks' matrices, AdamW (betas 0.8, 0.95) for the embedding and head."""
    adamw = torch.optim.AdamW(
        [{"params": [model.wte.weight], "lr": 0.03}, {"params": [model.lm_head.weight], "lr": 0.008}],
        betas=(0.8, 0.95),
        eps=1e-10,
        weight_decay=0.0,
    )
    muon = torch.optim.Muon([p for p in model.blocks.parameters()], lr=0.02, momentum=0.95, weight_decay=0.0)
    for opt in (adamw, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adamw, muon]


def _states(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [t.clone() for opt in optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]


def _loop(
    policy: str | None,
    *,
    steps: int = 8,
    accum: int = 2,
    shape: str = "nanochat",
    nan_at: int = -1,
    muon_momentum_nan_at: int = -1,
    **watch_kwargs,
):
    """nanochat: ``(loss / accum).backward()``; modded-nanogpt: ``loss.backward()`` then ``p.grad /= accum``."""
    torch.manual_seed(0)
    model = GPT()
    optimizers = _optimizers(model)
    watch = keel.watch(model, optimizers, policy=policy, **watch_kwargs) if policy else None
    batches, history, losses = iter(_batches(steps, accum)), [], []
    try:
        for step in range(steps):
            total = 0.0
            for micro in range(accum):
                x, y = next(batches)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(x, y)
                if step == nan_at and micro == 1:
                    loss = loss * float("nan")
                total += loss.item() / accum
                if shape == "nanochat":
                    (loss / accum).backward()
                else:
                    loss.backward()
            if shape == "modded-nanogpt":
                for p in model.parameters():
                    p.grad /= accum
            scale = 1.0 - step / (2 * steps)  # the loop's own LR schedule, written into every group
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * scale
            for group in optimizers[1].param_groups:
                group["momentum"] = 0.85 + 0.1 * min(step / 4, 1)
                if step == muon_momentum_nan_at:
                    # Muon's update turns its matrices NaN; AdamW's part stays finite (a NaN LR would be an lr_surge,
                    # skipped before it is applied; no detector reads the momentum)
                    group["momentum"] = float("nan")
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            history.append(([p.detach().clone() for p in model.parameters()], _states(optimizers)))
            losses.append(total)
    finally:
        if watch is not None:
            watch.close()
    return watch, history, losses, optimizers


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_under_observe_the_muon_loop_is_bit_identical_weights_and_both_optimizers_states():
    _, bare, _, _ = _loop(None)
    _, watched, _, _ = _loop("observe")
    assert all(_equal(p, q) and _equal(s, t) for (p, s), (q, t) in zip(bare, watched, strict=True))


def test_a_nan_micro_batch_holds_back_muon_and_adamw_alike():
    watch, history, losses, _ = _loop("skip", nan_at=4)
    assert [(d.step, d.action) for d in watch.decisions] == [(4, "skip")]
    (params_before, states_before), (params_after, states_after) = history[3], history[4]
    assert _equal(params_before, params_after) and _equal(states_before, states_after)  # Muon's momentum too
    assert all(p.isfinite().all() for p in history[-1][0])


def test_a_nan_muon_update_is_rolled_back_with_both_optimizers_states_and_aborts_under_skip():
    watch, history, _, (adamw, muon) = _loop(
        "recover", muon_momentum_nan_at=3, recovery=keel.RecoveryConfig(snapshot_every=2, quiet_steps=0)
    )
    assert [(d.step, d.action) for d in watch.decisions if not d.stepped] == [(3, "rollback")]
    assert all(p.isfinite().all() for p in history[-1][0])
    assert all(s["momentum_buffer"].isfinite().all() for s in muon.state.values())
    assert all(s["exp_avg"].isfinite().all() and s["exp_avg_sq"].isfinite().all() for s in adamw.state.values())
    with pytest.raises(TrainingAborted, match="a skip cannot mend non-finite parameters"):
        _loop("skip", muon_momentum_nan_at=3)


@pytest.mark.parametrize("shape", ["nanochat", "modded-nanogpt"])
def test_the_loss_keel_records_is_the_loops_mean_micro_batch_loss(shape, tmp_path):
    # modded-nanogpt divides the gradients, not the losses, by its accumulation steps: keel took the backward's
    # undivided losses and recorded their sum, 4x the loop's loss with 4 micro-batches
    _, _, losses, _ = _loop("observe", steps=3, accum=4, shape=shape, run_dir=tmp_path, log_every=1)
    with sqlite3.connect(tmp_path / "run.sqlite") as db:
        recorded = [v for (v,) in db.execute("select value from signals where key='loss' order by step")]
    assert recorded == pytest.approx(losses, rel=1e-5)


def test_the_adam_eps_probe_reads_the_adamw_part_and_leaves_muons_matrices_out(tmp_path):
    from keel.signals.adam_eps import AdamEpsProbe

    _loop("observe", steps=3, run_dir=tmp_path, log_every=1, probes=["loss", "grad_norm", AdamEpsProbe(every=2)])
    with sqlite3.connect(tmp_path / "run.sqlite") as db:
        keys = {k for (k,) in db.execute("select distinct key from signals where key like 'adam/%'")}
    assert keys == {
        "adam/update_rms",
        "adam/eps_dominated",
        "adam/eps_dominated/wte.weight",
        "adam/eps_dominated/lm_head.weight",
    }


@pytest.mark.slow
def test_a_resume_continues_the_muon_run_bit_identically(tmp_path):
    """A run stopped after step 5 and resumed from its disk snapshot of step 4 ends where the uninterrupted run
    does: the weights, Muon's momentum buffers and AdamW's moments (the loop's data replayed to the snapshot)."""
    recovery = keel.RecoveryConfig(snapshot_every=2, disk_every=1)

    def stopped_and_resumed() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT()
        optimizers = _optimizers(model)
        batches = _batches(8, 1)
        for resume, stop in ((False, 5), (True, 8)):
            with keel.watch(
                model, optimizers, policy="recover", run_dir=tmp_path / "a", resume=resume, recovery=recovery
            ) as watch:
                for step in range(watch.global_step, stop):
                    x, y = batches[step]
                    model(x, y).backward()
                    for opt in optimizers:
                        opt.step()
                    model.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()], _states(optimizers)

    torch.manual_seed(0)
    model = GPT()
    optimizers = _optimizers(model)
    with keel.watch(model, optimizers, policy="recover", run_dir=tmp_path / "b", recovery=recovery):
        for x, y in _batches(8, 1):
            model(x, y).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
    params, states = stopped_and_resumed()
    assert _equal(params, [p.detach() for p in model.parameters()]) and _equal(states, _states(optimizers))


class MuonAdamW(torch.optim.Optimizer):
    """nanochat's one optimizer in its shape (nanochat/optim.py, simplified math): ``kind``-tagged groups, AdamW's
    ``state["step"]`` a Python int, Muon's momentum stacked over its group and kept in the first parameter's state,
    ``step()`` with no closure argument."""

    def __init__(self, groups: list[dict]) -> None:
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    state = self.state[p]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    state["exp_avg"].lerp_(p.grad, 0.2)
                    state["exp_avg_sq"].lerp_(p.grad.square(), 0.05)
                    p.add_(state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"]), alpha=-group["lr"])
            else:
                params = group["params"]
                state = self.state[params[0]]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros(len(params), *params[0].shape)
                grads = torch.stack([p.grad for p in params])
                state["momentum_buffer"].lerp_(grads, 1 - group["momentum"])
                update = grads.lerp_(state["momentum_buffer"], group["momentum"])
                update = update / (update.norm(dim=(-2, -1), keepdim=True) + 1e-7)
                torch._foreach_sub_(params, list((group["lr"] * update).unbind(0)))


def _nanochat_optimizer(model: GPT) -> MuonAdamW:
    shapes: dict[tuple[int, ...], list[nn.Parameter]] = {}
    for p in model.blocks.parameters():
        shapes.setdefault(tuple(p.shape), []).append(p)
    return MuonAdamW(
        [{"kind": "adamw", "params": [model.wte.weight, model.lm_head.weight], "lr": 0.01, "eps": 1e-10}]
        + [{"kind": "muon", "params": ps, "lr": 0.02, "momentum": 0.95} for ps in shapes.values()]
    )


def _nanochat_loop(policy: str | None, nan_at: int = -1):
    torch.manual_seed(0)
    model = GPT()
    opt = _nanochat_optimizer(model)
    watch = keel.watch(model, opt, policy=policy) if policy else None
    try:
        for step, (x, y) in enumerate(_batches(6, 1)):
            (model(x, y) * (float("nan") if step == nan_at else 1.0)).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
    finally:
        if watch is not None:
            watch.close()
    return watch, [p.detach().clone() for p in model.parameters()]


def test_nanochats_one_muon_adamw_optimizer_is_watched_as_it_is():
    _, bare = _nanochat_loop(None)
    _, observed = _nanochat_loop("observe")
    assert _equal(bare, observed)
    watch, params = _nanochat_loop("skip", nan_at=3)
    assert [(d.step, d.action) for d in watch.decisions if not d.stepped] == [(3, "skip")]
    assert all(p.isfinite().all() for p in params)


def _per_optimizer_ready_loop(policy: str | None, *, schedulers: bool = False, steps: int = 5):
    """modded-nanogpt's distributed step without DDP: one async all-reduce per gradient, grouped per optimizer, and
    ``for opt in optimizers: collect_all(opt2futures[opt]).wait(); opt.step()`` — each optimizer's gradients are
    ready only just before its own step(). Here the 'reduce' of each part is done just before its step() (the
    gradients halved, as a mean over two ranks of which the other's are zero), with a scheduler each in zip."""
    torch.manual_seed(0)
    model = GPT()
    optimizers = _optimizers(model)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 - s / 10) for o in optimizers] if schedulers else []
    watch = keel.watch(model, optimizers, scheds or None, policy=policy) if policy else None
    try:
        for x, y in _batches(steps, 1):
            model(x, y).backward()
            for i, opt in enumerate(optimizers):
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.grad.mul_(0.5)  # this part's reduce, waited just before its step()
                opt.step()
                if scheds:
                    scheds[i].step()
            model.zero_grad(set_to_none=True)
    finally:
        if watch is not None:
            watch.close()
    return watch, [p.detach().clone() for p in model.parameters()], _states(optimizers)


@pytest.mark.parametrize("schedulers", [False, True])
def test_each_optimizer_steps_on_the_gradients_the_loop_readied_for_it(schedulers):
    # keel stepped Muon at AdamW's step() call, before the loop had reduced Muon's gradients: under torchrun the
    # ranks' weights drifted apart under observe (/tmp/h26F/dist_futures.py: max difference 0.05 after 10 steps)
    _, bare, bare_states = _per_optimizer_ready_loop(None, schedulers=schedulers)
    _, observed, observed_states = _per_optimizer_ready_loop("observe", schedulers=schedulers)
    assert _equal(bare, observed) and _equal(bare_states, observed_states)


def test_a_loop_that_zeroes_each_optimizers_gradients_after_its_step_trains_every_part():
    """``for opt in optimizers: opt.step(); opt.zero_grad(set_to_none=True)``: keel makes the update at the last
    optimizer's call, so the first one's zero_grad() is held until then (else AdamW would step on no gradients)."""

    def loop(policy: str | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT()
        optimizers = _optimizers(model)
        watch = keel.watch(model, optimizers, policy=policy) if policy else None
        try:
            for x, y in _batches(4, 1):
                model(x, y).backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        finally:
            if watch is not None:
                watch.close()
        return [p.detach().clone() for p in model.parameters()]

    initial = [p.detach().clone() for p in (torch.manual_seed(0), GPT())[1].parameters()]
    bare, observed = loop(None), loop("observe")
    assert not torch.equal(bare[0], initial[0])  # the embedding (AdamW's) trained
    assert _equal(bare, observed)
