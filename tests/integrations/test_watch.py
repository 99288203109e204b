"""keel.watch: a Guard on a loop as it is written (nanoGPT's shape: GradScaler, accumulation, own LR and clipping)."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel._core.errors import KeelWarning, TrainingAborted
from keel.integrations.watch import Watch, output_loss
from keel.store import RunReader

EXAMPLE = Path(__file__).parents[2] / "examples" / "nanogpt_style.py"


def _signal(run_dir: Path, key: str) -> list[float]:
    """One signal of a closed run, step by step."""
    run = RunReader(run_dir)
    try:
        return run.signal(key)[1].tolist()
    finally:
        run.close()


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- the nanoGPT-style example ---------------------------------------------------------------------------
def test_the_nanogpt_style_example_needs_at_most_four_keel_lines_and_runs_without_them(tmp_path):
    source = EXAMPLE.read_text()
    keel_lines = [line for line in source.splitlines() if line.rstrip().endswith("# keel") or "# keel (" in line]
    assert 1 <= len(keel_lines) <= 4, keel_lines
    # the loop without keel's lines is the same loop and runs: keel changed nothing else in it
    bare = "\n".join(line for line in source.splitlines() if line not in keel_lines)
    assert "keel." not in bare.split('"""', 2)[2].replace("keel.proxy", "")
    path = tmp_path / "bare_nanogpt.py"
    path.write_text(bare)
    _load(path, "bare_nanogpt").main(["--max-iters", "3", "--out", str(tmp_path / "bare")])
    assert not (tmp_path / "bare" / "keel").exists()


def test_the_nanogpt_style_example_skips_then_rolls_back_and_the_lr_backoff_survives_the_loops_lr_writes(tmp_path):
    example = _load(EXAMPLE, "nanogpt_style_example")
    example.main(["--max-iters", "45", "--bad-iters", "30,31,32", "--out", str(tmp_path)])
    run = RunReader(tmp_path / "keel")
    by_step = {d.step: d for d in run.decisions()}
    assert by_step[30].action == by_step[31].action == "skip" and by_step[30].by == "keel"
    assert by_step[32].action == "rollback" and by_step[32].restored_step is not None
    assert by_step[32].restored_step < 30
    # the loop writes nanoGPT's cosine LR every iteration; keel's LR × 0.1 back-off multiplies what it writes
    steps, lrs = run.signal("lr")
    lr = dict(zip(steps.tolist(), lrs.tolist(), strict=True))
    assert lr[40] == pytest.approx(0.1 * _nanogpt_lr(40, 45), rel=1e-6)
    assert lr[29] == pytest.approx(_nanogpt_lr(29, 45), rel=1e-6)
    # the loss keel saw is the undivided mean over the micro-batches (the model's output), finite
    steps, losses = run.signal("loss")
    assert 3.0 < losses[0] < 7.0  # ≈ ln(256) at the start for a byte-level model, not its half
    run.close()


def _nanogpt_lr(it: int, max_iters: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 20) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (max_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_under_an_enabled_grad_scaler_an_overflow_is_the_scalers_skip_and_the_scale_halves_once(tmp_path):
    example = _load(EXAMPLE, "nanogpt_style_fp16")
    scales = []
    original = torch.amp.GradScaler.update

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        scales.append(self.get_scale())
        return result

    torch.amp.GradScaler.update = spy
    try:
        example.main(["--max-iters", "4", "--bad-iters", "2", "--dtype", "float16", "--out", str(tmp_path)])
    finally:
        torch.amp.GradScaler.update = original
    run = RunReader(tmp_path / "keel")
    assert [(d.step, d.action, d.by) for d in run.decisions()] == [(2, "skip", "scaler")]
    # keel updated the scaler once per iteration; the loop's own scaler.update() did nothing
    assert len(scales) == 5 and scales[2] == scales[1] / 2
    run.close()


# --- the loss ---------------------------------------------------------------------------------------------
class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x, y=None):
        out = self.fc(x)
        return out, (None if y is None else F.mse_loss(out, y))


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def test_the_loss_is_the_mean_of_the_micro_batch_losses_in_the_models_output(tmp_path):
    torch.manual_seed(0)
    model = TupleModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.watch(model, opt, run_dir=str(tmp_path)):
        expected = []
        for batch in (_data(2, 0), _data(2, 1)):
            micro = []
            for x, y in batch:
                _, loss = model(x, y)
                micro.append(loss.item())
                (loss / 2).backward()
            with torch.no_grad():  # an evaluation forward in between is not counted
                model(x, y)
            opt.step()
            opt.zero_grad()
            expected.append(sum(micro) / 2)
    assert _signal(tmp_path, "loss") == pytest.approx(expected, rel=1e-6)


def test_without_a_loss_in_the_output_the_loss_comes_from_backward_unscaled_and_summed(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with keel.watch(model, opt, scaler=scaler, run_dir=str(tmp_path)):
        micro = []
        for x, y in _data(3):
            loss = F.mse_loss(model(x), y)
            micro.append(loss.item())
            scaler.scale(loss / 3).backward()
        scaler.step(opt)
        scaler.update()
    assert _signal(tmp_path, "loss") == [pytest.approx(sum(micro) / 3, rel=1e-5)]


def test_a_recorded_loss_wins_over_the_output_and_the_backward(tmp_path):
    model = TupleModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.watch(model, opt, run_dir=str(tmp_path)) as guard:
        x, y = _data(1)[0]
        _, loss = model(x, y)
        guard.record(torch.tensor(7.0))
        guard.record(9.0)
        loss.backward()
        opt.step()
    assert _signal(tmp_path, "loss") == [8.0]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ((torch.ones(2), torch.tensor(3.0)), 3.0),  # nanoGPT: logits, loss
        ({"loss": torch.tensor(2.0), "logits": torch.ones(2)}, 2.0),
        (torch.tensor(5.0), None),  # a bare tensor is the model's prediction, not a loss
        ((torch.tensor(1.0), torch.tensor(2.0)), None),  # two scalars: ambiguous
        ((torch.ones(2), None), None),
        ((torch.tensor(1),), None),  # an integer scalar is no loss
        ([], None),
        (None, None),
        ("loss", None),
        ({"loss": torch.ones(3)}, None),
    ],
)
def test_output_loss_finds_the_one_loss_or_none(output, expected):
    loss = output_loss(output)
    assert (loss is None) if expected is None else (loss.item() == expected)


def test_no_loss_at_all_warns_once_and_still_checks_the_gradients():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.watch(model, opt, policy="skip") as guard:
        with pytest.warns(KeelWarning, match="saw no loss"):
            for step in range(3):
                x, y = _data(1, step)[0]
                torch.autograd.backward(F.mse_loss(model(x), y))  # not Tensor.backward: keel cannot see it
                if step == 2:
                    model.weight.grad[0, 0] = float("nan")
                opt.step()
                opt.zero_grad()
        assert [d.action for d in guard.decisions] == ["skip"]


# --- the loop's own clipping --------------------------------------------------------------------------
def test_keel_detects_on_the_norm_before_the_loops_clipping_and_stores_the_clipped_one(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with keel.watch(model, opt, policy="skip", run_dir=str(tmp_path)) as guard:
        returned = []
        for step, (x, y) in enumerate(_data(40)):
            scale = 1e4 if step == 35 else 1.0  # a gradient spike the loop's clipping would hide
            (scale * F.mse_loss(model(x), y)).backward()
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
            opt.step()
            opt.zero_grad()
        assert [(d.step, d.action) for d in guard.decisions] == [(35, "skip")]
    assert _signal(tmp_path, "grad/norm") == pytest.approx(returned, rel=1e-6)
    assert max(_signal(tmp_path, "grad/clipped_norm")) <= 0.5 + 1e-6


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_keels_own_clipping_after_the_loops_uses_the_clipped_gradients_norm(sync):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
        )
    )
    with keel.watch(model, opt, max_grad_norm=0.25, sync=sync):
        x, y = _data(1)[0]
        (100 * F.mse_loss(model(x), y)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert seen == [pytest.approx(0.25, rel=1e-4)]  # not 0.25 × 1.0 / (the norm before the loop clipped)


def test_a_clip_of_other_parameters_is_not_taken_for_the_models(tmp_path):
    model, other = nn.Linear(4, 1), nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.watch(model, opt, run_dir=str(tmp_path)):
        x, y = _data(1)[0]
        F.mse_loss(model(x), y).backward()
        F.mse_loss(other(x), y).backward()
        other.weight.grad.mul_(1e6)
        torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)
        opt.step()
    run = RunReader(tmp_path)
    assert "grad/clipped_norm" not in run.signal_keys() and run.signal("grad/norm")[1][0] < 1e3
    run.close()


# --- equivalence with Guard.step, and bit-identity under observe ---------------------------------------
def _train(policy: str | None, use_watch: bool, bad: int = 12):
    torch.manual_seed(0)
    model = TupleModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = None
    if policy is not None:
        guard = keel.watch(model, opt, policy=policy) if use_watch else keel.Guard(model, opt, policy=policy)
    params = []
    for step, (x, y) in enumerate(_data(20)):
        _, loss = model(x, y)
        loss.backward()
        if step == bad:
            model.fc.weight.grad[0, 0] = float("inf")
        if use_watch or guard is None:
            opt.step()
        else:
            guard.step(loss)
        opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
    decisions = [(d.step, d.action) for d in guard.decisions] if guard is not None else []
    if guard is not None:
        guard.close()
    return params, decisions


def test_watch_decides_and_steps_exactly_as_guard_step():
    via_watch, decisions_watch = _train("skip", use_watch=True)
    via_step, decisions_step = _train("skip", use_watch=False)
    assert decisions_watch == decisions_step == [(12, "skip")]
    for a, b in zip(via_watch, via_step, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_under_observe_the_watched_loop_is_bit_identical_to_the_bare_loop():
    watched, _ = _train("observe", use_watch=True, bad=-1)
    bare, _ = _train(None, use_watch=True, bad=-1)
    for a, b in zip(watched, bare, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# --- the end: everything put back ------------------------------------------------------------------------
def test_close_puts_back_every_hooked_call_and_is_safe_twice():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 5)
    scaler = torch.amp.GradScaler("cpu")
    before = (torch.Tensor.backward, torch.nn.utils.clip_grad_norm_, scaler.step, scaler.update)
    own = (vars(opt).get("step"), vars(scheduler).get("step"))  # StepLR wraps opt.step itself
    guard = keel.watch(model, opt, scheduler, scaler=scaler)
    assert torch.Tensor.backward is not before[0] and torch.nn.utils.clip_grad_norm_ is not before[1]
    guard.close()
    guard.close()
    assert (torch.Tensor.backward, torch.nn.utils.clip_grad_norm_, scaler.step, scaler.update) == before
    assert (vars(opt).get("step"), vars(scheduler).get("step")) == own and not model._forward_hooks


def test_an_abort_propagates_from_the_loops_update_call_and_unhooks_everything():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = keel.watch(model, opt, policy="skip", max_consecutive_skips=1)
    with pytest.raises(TrainingAborted):
        for x, y in _data(5):
            F.mse_loss(model(x), y).backward()
            model.weight.grad.fill_(float("nan"))
            opt.step()
    assert "step" not in vars(opt) and not model._forward_hooks
    assert guard.decisions[-1].action == "abort"


def test_a_closure_step_is_watched_and_another_optimizers_scaler_step_passes_through():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with keel.watch(model, opt, scaler=scaler) as guard:
        x, y = _data(1)[0]

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        before = model.weight.detach().clone()
        expected = F.mse_loss(model(x), y).item()
        with warnings.catch_warnings():
            warnings.simplefilter("error", KeelWarning)
            loss = opt.step(closure)  # evaluated once, as SGD does; before, passed through unwatched
        assert guard.global_step == 1 and not torch.equal(model.weight, before)
        assert loss.item() == expected  # step() returns the closure's loss, as torch's optimizers do
        scaler.step(other)
        assert guard.global_step == 1


def test_a_step_call_with_arguments_besides_a_closure_passes_through_unwatched():
    model = nn.Linear(4, 1)
    opt = _SGDWithGradScale(model.parameters(), lr=0.1)
    with keel.watch(model, opt) as guard:
        x, y = _data(1)[0]
        F.mse_loss(model(x), y).backward()
        with pytest.warns(KeelWarning, match="besides a closure"):
            opt.step(None, 2.0)
        assert guard.global_step == 0


class _SGDWithGradScale(torch.optim.SGD):
    """An optimizer whose step() takes one more argument (apex's and some fused optimizers' shape)."""

    def step(self, closure=None, grad_scale=None):
        return super().step(closure)


def test_watch_refuses_bad_arguments_with_the_guards_one_clear_error():
    model = nn.Linear(4, 1)
    before = (torch.Tensor.backward, torch.nn.utils.clip_grad_norm_)
    with pytest.raises(ValueError, match="optimizer="):
        keel.watch(model, object())
    with pytest.raises(ValueError, match="policy"):
        keel.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), policy="yolo")
    assert (torch.Tensor.backward, torch.nn.utils.clip_grad_norm_) == before  # nothing was hooked


@pytest.mark.parametrize("bad", [torch.ones(3), "1.0", None.__class__, 1j, True])
def test_guard_step_refuses_a_bad_grad_norm_naming_it(bad):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.Guard(model, opt) as guard:
        model(torch.ones(1, 4)).sum().backward()
        with pytest.raises(ValueError, match="grad_norm"):
            guard.step(torch.tensor(1.0), grad_norm=bad)


def test_the_watch_answers_for_its_guard():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with keel.watch(model, opt) as guard:
            assert isinstance(guard, Watch) and guard.global_step == 0 and guard.findings == []
            with pytest.raises(AttributeError):
                guard.no_such_attribute  # noqa: B018


def test_a_watched_loop_ended_by_an_exception_is_recorded_as_failed_not_finished(tmp_path):
    """keel.watch closes itself at exit; an uncaught exception must still read 'failed' (its atexit hook ran before
    the Guard's and recorded 'finished')."""
    import subprocess

    script = tmp_path / "child.py"
    script.write_text(
        "import sys, torch\nfrom torch import nn\nimport keel\n"
        "m = nn.Linear(4, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "keel.watch(m, opt, run_dir=sys.argv[1])\n"
        "for _ in range(3):\n"
        "    m(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
        "if sys.argv[2] == 'fail':\n    raise RuntimeError('the loop failed')\n"
    )
    ends = {"fail": "failed: RuntimeError: the loop failed", "end": "finished"}
    children = {how: subprocess.Popen([sys.executable, str(script), str(tmp_path / how), how]) for how in ends}
    for how, status in ends.items():
        assert children[how].wait(timeout=120) == (1 if how == "fail" else 0)
        run = RunReader(tmp_path / how)
        try:
            assert run.meta()["status"] == status and len(run.signal("loss")[0]) == 3
        finally:
            run.close()
