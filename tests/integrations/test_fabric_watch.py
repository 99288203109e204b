"""keel.watch on a Lightning Fabric loop: ``model, opt = fabric.setup(model, opt)``, ``fabric.backward(loss)``,
``opt.step()``. Fabric's fp16 path (``16-mixed``: its precision plugin's GradScaler scales in ``fabric.backward``,
steps and updates in ``opt.step()``) runs here on the CPU with a CPU GradScaler given to the plugin."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import keel
from keel import KeelWarning
from keel.guard.fabric import fabric_scaler_of, fabric_wrapped
from keel.integrations.watch import _scaler_skipped, adversarial_detectors, watch
from keel.store import RunReader

pytest.importorskip("lightning")
from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.plugins import MixedPrecision  # noqa: E402

SCALE = 1024.0


def _fabric(fp16: bool) -> Fabric:
    if not fp16:
        return Fabric(accelerator="cpu", devices=1, precision="32-true")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    return Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


def _train(fabric: Fabric, tmp_path, *, nan_at: int = -1, steps: int = 6, **watch_kwargs):
    """A Fabric loop under keel.watch (given the objects fabric.setup returned); the loop's losses and the store."""
    torch.manual_seed(0)
    plain = nn.Linear(4, 1)
    model, opt = fabric.setup(plain, torch.optim.SGD(plain.parameters(), lr=0.01))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    losses = []
    with watch(model, opt, policy="skip", run_dir=tmp_path / "run", **watch_kwargs):
        for step in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            if step == nan_at:
                loss = loss * float("nan")
            fabric.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return model, losses, RunReader(tmp_path / "run")


def _unscaled_norms(tmp_path, steps: int = 6) -> list[float]:
    """The gradient norms of the same loop, bare, in fp32."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    norms = []
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
        opt.step()
        opt.zero_grad()
    return norms


def test_fp16_fabric_optimizer_with_fabric_scaler_given_trains(tmp_path) -> None:
    # was: AssertionError "No inf checks were recorded prior to update" at the first opt.step() (keel stepped the
    # scaler around Fabric's optimizer, whose step() steps and updates the same scaler itself)
    fabric = _fabric(fp16=True)
    model, losses, reader = _train(fabric, tmp_path, nan_at=3, scaler=fabric._precision.scaler)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [d.step for d in reader.decisions() if not d.stepped] == [3]
    assert reader.signal("grad/norm")[1][:3] == pytest.approx(_unscaled_norms(tmp_path)[:3], rel=1e-3)


def test_fp16_fabric_optimizer_alone_judges_unscaled_gradients(tmp_path) -> None:
    # was: keel's grad/norm was x the loss scale (1024x), growing with the scale, and no warning named the scaler
    fabric = _fabric(fp16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)
        _, losses, reader = _train(fabric, tmp_path)
    assert reader.signal("grad/norm")[1] == pytest.approx(_unscaled_norms(tmp_path), rel=1e-3)
    assert reader.signal("loss")[1] == pytest.approx(losses, rel=1e-6)


def test_fp32_fabric_clip_gradients_norm_before_clipping_is_kept(tmp_path) -> None:
    fabric = _fabric(fp16=False)
    torch.manual_seed(0)
    plain = nn.Linear(4, 1)
    model, opt = fabric.setup(plain, torch.optim.SGD(plain.parameters(), lr=0.01))
    x, y = torch.randn(32, 4), 100 * torch.randn(32, 1)
    returned = []
    with watch(model, opt, policy="skip", run_dir=tmp_path / "run"):
        for _ in range(3):
            fabric.backward(nn.functional.mse_loss(model(x), y))
            returned.append(float(fabric.clip_gradients(model, opt, max_norm=1.0)))
            opt.step()
            opt.zero_grad()
    assert min(returned) > 1.0  # the clipping bound: keel keeps the norm before it
    assert RunReader(tmp_path / "run").signal("grad/norm")[1] == pytest.approx(returned, rel=1e-6)


class _AnswersEverything:
    """An object whose every attribute is itself (a proxy, a mock): no Fabric optimizer."""

    def __getattr__(self, name: str) -> _AnswersEverything:
        return self


@pytest.mark.parametrize(
    "obj",
    [None, 3, "opt", object(), _AnswersEverything(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)],
    ids=["none", "int", "str", "object", "proxy", "sgd"],
)
def test_anything_but_a_fabric_optimizer_is_left_as_it_is(obj) -> None:
    assert fabric_wrapped(obj) is obj
    assert fabric_scaler_of([obj]) is None


def test_a_fabric_optimizer_is_taken_as_the_one_it_wraps() -> None:
    fabric = _fabric(fp16=True)
    plain = nn.Linear(2, 1)
    inner = torch.optim.SGD(plain.parameters(), lr=0.1)
    _, opt = fabric.setup(plain, inner)
    assert fabric_wrapped(opt) is inner
    assert fabric_scaler_of([opt]) is fabric._precision.scaler
    assert fabric_scaler_of([inner]) is None  # the raw optimizer names no plugin: the loop passes scaler= itself


def test_guard_max_grad_norm_clips_the_unscaled_gradients_of_a_fp16_fabric_loop(tmp_path) -> None:
    """keel.Guard (not watch) on fabric.setup's objects, the loop's ``fabric.backward(loss); guard.step(loss)``: keel
    measured and clipped the scaled gradients (x1024), so max_grad_norm=1.0 made SGD's updates 1/1024 as large."""
    fabric = _fabric(fp16=True)
    torch.manual_seed(0)
    plain = nn.Linear(4, 1)
    model, opt = fabric.setup(plain, torch.optim.SGD(plain.parameters(), lr=0.01))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with keel.Guard(model, opt, policy="skip", run_dir=tmp_path / "run", max_grad_norm=10.0) as guard:
        for _ in range(3):
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            guard.step(loss)
            opt.zero_grad()
    assert RunReader(tmp_path / "run").signal("grad/norm")[1] == pytest.approx(_unscaled_norms(tmp_path)[:3], rel=1e-3)


def test_a_watch_on_the_optimizer_before_fabric_setup_is_told_to_take_what_setup_returned(tmp_path) -> None:
    fabric = _fabric(fp16=True)
    plain = nn.Linear(4, 1)
    inner = torch.optim.SGD(plain.parameters(), lr=0.01)
    with pytest.warns(KeelWarning, match="fabric.setup returned"), watch(plain, inner, run_dir=tmp_path / "run"):
        model, opt = fabric.setup(plain, inner)
        fabric.backward(nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)))
        opt.step()


def test_a_gan_under_fabric_16_mixed_a_nan_in_g_is_not_taken_for_ds_loss(tmp_path) -> None:
    """Two models, two optimizers, Fabric's one GradScaler (a GAN: D's backward and step, then G's). The scaler skips
    G's update on G's NaN loss itself, so G's watch never sees it; G's loss, which ran through D too, went to D's next
    update: keel recorded D's loss NaN there and D's applied update as the scaler's skip."""
    fabric = _fabric(fp16=True)
    torch.manual_seed(0)
    g_net, d_net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Linear(2, 1)
    g_net, opt_g = fabric.setup(g_net, torch.optim.Adam(g_net.parameters(), lr=1e-3))
    d_net, opt_d = fabric.setup(d_net, torch.optim.Adam(d_net.parameters(), lr=1e-3))
    bce = nn.BCEWithLogitsLoss()
    kw = {"policy": "skip", "detectors": adversarial_detectors()}
    d_moved = []
    with watch(d_net, opt_d, run_dir=tmp_path / "d", **kw) as on_d, watch(g_net, opt_g, run_dir=tmp_path / "g", **kw):
        for step in range(8):
            fake = g_net(torch.randn(16, 4))
            real = torch.randn(16, 2) + 3
            err_d = bce(d_net(real), torch.ones(16, 1)) + bce(d_net(fake.detach()), torch.zeros(16, 1))
            before = d_net.weight.detach().clone()
            opt_d.zero_grad()
            fabric.backward(err_d)
            opt_d.step()
            d_moved.append(not torch.equal(before, d_net.weight))
            err_g = bce(d_net(fake), torch.ones(16, 1)) * (float("nan") if step == 5 else 1.0)
            opt_g.zero_grad()
            fabric.backward(err_g)
            opt_g.step()
    assert all(d_moved)
    assert on_d.decisions == []  # every update of D was applied, and recorded so
    assert all(torch.isfinite(torch.tensor(RunReader(tmp_path / "d").signal("loss")[1])))


class _StatelessScaler:
    """A scaler that only looks like torch's: no per-optimizer states."""


@pytest.mark.parametrize(
    ("scaler", "skipped"),
    [
        (None, False),
        (_StatelessScaler(), False),
        (_AnswersEverything(), False),
        ("states", False),
        (torch.amp.GradScaler("cpu"), False),  # never stepped
    ],
    ids=["none", "stateless", "proxy", "str", "fresh"],
)
def test_a_scaler_skip_is_read_only_from_a_grad_scalers_own_flags(scaler, skipped: bool) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert _scaler_skipped(scaler, optimizer) is skipped


@pytest.mark.parametrize("grad", [float("nan"), float("inf"), 1.0], ids=["nan", "inf", "finite"])
def test_a_scaler_skip_is_what_the_grad_scalers_step_found(grad: float) -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer, scaler = torch.optim.SGD([param], lr=0.1), torch.amp.GradScaler("cpu")
    param.grad = torch.full((1,), grad)
    scaler.scale(torch.ones(()))  # (the scale a step needs)
    scaler.step(optimizer)
    assert _scaler_skipped(scaler, optimizer) is (grad != 1.0)
    assert torch.equal(param.detach(), torch.zeros(1)) is (grad != 1.0)


def test_a_look_alike_fabric_optimizer_without_a_strategy_gives_no_scaler() -> None:
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    look_alike = type("_FabricOptimizer", (), {"optimizer": inner})()
    assert fabric_wrapped(look_alike) is inner
    assert fabric_scaler_of([look_alike]) is None
