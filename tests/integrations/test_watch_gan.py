"""keel.watch on a loop with a backward per optimizer (pytorch/examples' dcgan): one watch per model and optimizer,
each taking the losses of its own update (`keel.integrations._backward_owner`)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import keel
from keel._core.errors import KeelWarning
from keel.detect import DivergenceDetector, SpikeDetector, default_detectors
from keel.integrations._backward_owner import OWNERS
from keel.integrations.watch import adversarial_detectors
from keel.store import RunReader

ITERATIONS = 30


def _losses(run_dir) -> dict[int, float]:
    run = RunReader(run_dir)
    try:
        steps, values = run.signal("loss")
        return dict(zip(steps.tolist(), values.tolist(), strict=True))
    finally:
        run.close()


def _dcgan(policy: str | None, run_dir=None, *, nan_g_at: int = -1, detectors=None):
    """dcgan/main.py's shape: D on real and (detached) fake, D steps; then G through D, G steps.
    Returns each iteration's D and G loss as the loop computed them, the watches, and the final parameters."""
    torch.manual_seed(0)
    net_g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    net_d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    watches = ()
    if policy is not None:
        kw = {"detectors": detectors()} if detectors else {}
        watch_d = keel.watch(net_d, opt_d, policy=policy, run_dir=run_dir and run_dir / "D", **kw)
        watch_g = keel.watch(net_g, opt_g, policy=policy, run_dir=run_dir and run_dir / "G", **kw)
        watches = (watch_d, watch_g)
    bce = nn.BCEWithLogitsLoss()
    d_losses, g_losses = [], []
    for i in range(ITERATIONS):
        net_d.zero_grad()
        err_d_real = bce(net_d(torch.randn(16, 8) + 2), torch.ones(16, 1))
        err_d_real.backward()
        fake = net_g(torch.randn(16, 4))
        err_d_fake = bce(net_d(fake.detach()), torch.zeros(16, 1))
        err_d_fake.backward()
        opt_d.step()
        net_g.zero_grad()
        err_g = bce(net_d(fake), torch.ones(16, 1)) * (float("nan") if i == nan_g_at else 1.0)
        err_g.backward()
        opt_g.step()
        d_losses.append((err_d_real + err_d_fake).item())
        g_losses.append(err_g.item())
    for watch in watches:
        watch.close()
    params = [p.detach().clone() for net in (net_d, net_g) for p in net.parameters()]
    return d_losses, g_losses, watches, params


def test_a_nan_in_the_generators_loss_skips_the_generators_update_and_not_the_discriminators(tmp_path):
    with pytest.warns(KeelWarning, match="adversarial_detectors"):  # the default detectors: told once
        _, _, (watch_d, watch_g), _ = _dcgan("skip", tmp_path, nan_g_at=20)
    assert [(d.step, d.action) for d in watch_g.decisions] == [(20, "skip")]
    assert watch_d.decisions == []  # before: D's next update took G's NaN loss as its own, and was skipped


def test_each_watch_takes_the_losses_of_its_own_update(tmp_path):
    d_losses, g_losses, _, _ = _dcgan("observe", tmp_path, detectors=adversarial_detectors)
    seen_d, seen_g = _losses(tmp_path / "D"), _losses(tmp_path / "G")
    # D: err_d_real + err_d_fake (its two backwards); G: err_g alone, although err_g's graph runs through D
    assert [seen_d[i] for i in range(ITERATIONS)] == [torch.tensor(x).item() for x in d_losses]
    assert [seen_g[i] for i in range(ITERATIONS)] == [torch.tensor(x).item() for x in g_losses]


def test_under_observe_the_watched_gan_is_bit_identical_to_the_bare_one():
    *_, watched = _dcgan("observe", detectors=adversarial_detectors)
    *_, bare = _dcgan(None)
    assert all(torch.equal(p, q) for p, q in zip(watched, bare, strict=True))


def test_two_models_trained_side_by_side_each_get_their_own_loss(tmp_path):
    """backward A, backward B, step A, step B: the first watch to update takes only the loss that reached it."""
    torch.manual_seed(0)
    model_a, model_b = nn.Linear(4, 1), nn.Linear(4, 1)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    watch_a = keel.watch(model_a, opt_a, policy="observe", run_dir=tmp_path / "A")
    watch_b = keel.watch(model_b, opt_b, policy="observe", run_dir=tmp_path / "B")
    x = torch.randn(8, 4)
    loss_a, loss_b = model_a(x).pow(2).mean(), (model_b(x) - 5).pow(2).mean()
    loss_a.backward()
    loss_b.backward()
    opt_a.step()
    opt_b.step()
    watch_a.close()
    watch_b.close()
    assert _losses(tmp_path / "A")[0] == loss_a.item()
    assert _losses(tmp_path / "B")[0] == loss_b.item()


def test_two_models_trained_on_one_loss_both_record_it_and_are_not_called_a_gan(tmp_path):
    """An encoder and a decoder, one optimizer each, one joint loss: the decoder's watch stored 0.0 at every step
    and keel called the pair a GAN (reviewer W6); both updates are the loss's, and a NaN in it skips both."""
    torch.manual_seed(0)
    enc, dec = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 8)
    opt_e, opt_d = torch.optim.AdamW(enc.parameters(), 1e-3), torch.optim.AdamW(dec.parameters(), 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeelWarning)  # no GAN advice for a cooperative pair
        watch_e = keel.watch(enc, opt_e, policy="skip", run_dir=tmp_path / "enc")
        watch_d = keel.watch(dec, opt_d, policy="skip", run_dir=tmp_path / "dec")
        losses = []
        for step in range(25):
            x = torch.randn(32, 8)
            loss = nn.functional.mse_loss(dec(enc(x)), x) * (float("nan") if step == 22 else 1.0)
            loss.backward()
            opt_e.step()
            opt_d.step()
            opt_e.zero_grad()
            opt_d.zero_grad()
            losses.append(loss.item())
    watch_e.close()
    watch_d.close()
    for name, watch in (("enc", watch_e), ("dec", watch_d)):
        stored = [value for _, value in sorted(_losses(tmp_path / name).items())]
        assert stored[:22] == losses[:22] and stored[22] != stored[22], name  # the NaN stored as NaN
        assert [(d.step, d.action) for d in watch.guard.decisions if d.action != "ok"] == [(22, "skip")]


def test_a_closed_watch_leaves_every_backward_to_the_one_still_open(tmp_path):
    model_a, model_b = nn.Linear(4, 1), nn.Linear(4, 1)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    keel.watch(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), policy="observe").close()
    watch_a = keel.watch(model_a, opt_a, policy="observe", run_dir=tmp_path)
    loss = model_a(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt_a.step()
    watch_a.close()
    assert _losses(tmp_path)[0] == loss.item()
    assert OWNERS._keys == set() and OWNERS._owners == {}  # nothing of either watch is left behind


def _keel_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, KeelWarning)]


def test_a_gan_with_the_default_detectors_is_told_once_to_take_the_adversarial_ones():
    messages = _keel_warnings(lambda: _dcgan("observe"))
    assert len(messages) == 1 and "detectors=adversarial_detectors()" in messages[0]
    assert "from keel.integrations.watch import adversarial_detectors" in messages[0]  # importable as written


def test_with_the_adversarial_detectors_a_nan_in_g_is_still_skipped_and_nothing_is_warned():
    found = {}
    messages = _keel_warnings(lambda: found.update(w=_dcgan("recover", nan_g_at=20, detectors=adversarial_detectors)))
    _, _, (watch_d, watch_g), _ = found["w"]
    assert messages == []
    assert [(d.step, d.action) for d in watch_g.decisions] == [(20, "skip")] and watch_d.decisions == []


def test_the_adversarial_detectors_are_the_defaults_without_the_loss_spike_and_divergence():
    def described(detectors):
        return [(d.name, getattr(getattr(d, "config", None), "signal", None)) for d in detectors]

    left_out = [("spike", "loss"), ("divergence", "loss")]
    assert described(adversarial_detectors()) == [d for d in described(default_detectors()) if d not in left_out]
    assert not any(isinstance(d, DivergenceDetector) for d in adversarial_detectors())
    assert [d.config.signal for d in adversarial_detectors() if isinstance(d, SpikeDetector)] == ["grad/norm"]


def _amp_gan(policy: str | None, run_dir=None):
    """A GAN with one GradScaler for both optimizers, scaler.update() once per iteration (common AMP GAN code)."""
    torch.manual_seed(0)
    net_g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    net_d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_d, opt_g = torch.optim.Adam(net_d.parameters(), lr=2e-4), torch.optim.Adam(net_g.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler("cpu", growth_interval=5)
    watches = []
    if policy is not None:
        kw = {"policy": policy, "scaler": scaler, "detectors": adversarial_detectors()}
        watches = [
            keel.watch(net_d, opt_d, run_dir=run_dir / "D", **kw),
            keel.watch(net_g, opt_g, run_dir=run_dir / "G", **kw),
        ]
    bce, g_losses = nn.BCEWithLogitsLoss(), []
    for _ in range(ITERATIONS):
        net_d.zero_grad()
        fake = net_g(torch.randn(16, 4))
        err_d = bce(net_d(torch.randn(16, 8) + 2), torch.ones(16, 1)) + bce(net_d(fake.detach()), torch.zeros(16, 1))
        scaler.scale(err_d).backward()
        scaler.step(opt_d)
        net_g.zero_grad()
        err_g = bce(net_d(fake), torch.ones(16, 1))
        scaler.scale(err_g).backward()
        scaler.step(opt_g)
        scaler.update()
        g_losses.append(err_g.item())
    for watch in watches:
        watch.close()
    return [p.detach().clone() for net in (net_d, net_g) for p in net.parameters()], scaler, g_losses


def test_a_grad_scaler_shared_by_the_two_watches_is_stepped_as_the_bare_loop_steps_it(tmp_path):
    """Before, the second watch's hooks on the same scaler ate the update after G's step: the loop's next
    scaler.step(optimizerG) raised 'step() has already been called since the last update()'."""
    watched, scaler, g_losses = _amp_gan("observe", tmp_path)
    bare, bare_scaler, _ = _amp_gan(None)
    assert all(torch.equal(p, q) for p, q in zip(watched, bare, strict=True))
    assert scaler.get_scale() == bare_scaler.get_scale() > 65536.0  # it grew: the updates were made
    assert [_losses(tmp_path / "G")[i] for i in range(ITERATIONS)] == pytest.approx(g_losses, rel=1e-6)  # unscaled
    assert "step" not in vars(scaler) and "update" not in vars(scaler)  # both watches closed: the scaler is bare


def _hooked(model: nn.Module) -> int:
    return sum(bool(p._post_accumulate_grad_hooks) for p in model.parameters())


def test_the_models_a_backward_reached_are_learnt_from_its_gradients_and_the_hooks_go_with_the_watches():
    """Reviewer W12: with two watches open, every backward walked its autograd graph in Python before running (18-29 ms
    on a 24-layer GPT-2, whose D-only losses never find the other watch). The reached models are now marked by a
    hook on each watched parameter as its gradient lands: one watch hooks nothing, the second hooks both models, and
    closing them leaves the models as they were."""
    net_g, net_d = nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    net_d[0].bias.requires_grad_(False)  # frozen: takes no gradient, carries no hook
    opt_g, opt_d = torch.optim.SGD(net_g.parameters(), lr=0.1), torch.optim.SGD(net_d.parameters(), lr=0.1)
    watch_d = keel.watch(net_d, opt_d, policy="observe", detectors=adversarial_detectors())
    assert _hooked(net_d) == 0
    watch_g = keel.watch(net_g, opt_g, policy="observe", detectors=adversarial_detectors())
    assert (_hooked(net_d), _hooked(net_g)) == (3, 2)
    fake = net_g(torch.randn(4, 4))
    err_d = net_d(fake.detach()).mean()  # reaches D only
    err_d.backward()
    opt_d.step()
    err_g = net_d(fake).pow(2).mean()  # reaches G and D; G updates first
    err_g.backward()
    opt_g.step()
    assert watch_d.guard.recorder._losses.tolist() == [err_d.item()]
    assert watch_g.guard.recorder._losses.tolist() == [err_g.item()]
    watch_g.close()
    assert (_hooked(net_d), _hooked(net_g)) == (0, 0)
    watch_d.close()


def test_the_list_form_on_a_gan_is_refused_at_the_generators_first_backward_before_g_is_touched():
    """``keel.watch(netD, [optD, optG])`` on dcgan's loop: keel stepped G at D's step, and errG.backward() of the next
    iteration failed in autograd ("modified by an inplace operation") after keel's warning (session 11). Now one
    ValueError at the first errG.backward(), naming the two-watch form; neither model took an update (keel waits for
    the last optimizer's step() call of an update, G's, which the loop makes after its own backward)."""
    torch.manual_seed(0)
    net_g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    net_d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_before = [p.detach().clone() for p in net_g.parameters()]
    watch = keel.watch(net_d, [opt_d, opt_g], policy="skip")
    bce = nn.BCEWithLogitsLoss()
    net_d.zero_grad()
    bce(net_d(torch.randn(16, 8) + 2), torch.ones(16, 1)).backward()
    fake = net_g(torch.randn(16, 4))
    bce(net_d(fake.detach()), torch.zeros(16, 1)).backward()
    opt_d.step()
    net_g.zero_grad()
    err_g = bce(net_d(fake), torch.ones(16, 1))
    with pytest.raises(ValueError, match=r"keel.watch\(netD, optimizerD\); keel.watch\(netG, optimizerG\)"):
        err_g.backward()
    assert all(torch.equal(p, b) for p, b in zip(net_g.parameters(), g_before, strict=True))
    assert [d.action for d in watch.guard.decisions] == [] and watch.guard.global_step == 0


def test_a_model_under_a_reentrant_checkpoint_gets_its_loss_with_another_watch_open():
    """torch.utils.checkpoint(use_reentrant=True) (older HF gradient_checkpointing, Megatron) recomputes its segment
    in a backward of its own: the model's parameters are not in the loss's graph, and the graph walk gave the loss
    to no watch (A's watch stored 0.0 at every step). Its gradients landing is what counts now."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body, other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), nn.Linear(4, 1)
    opt_a, opt_b = torch.optim.SGD(body.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1)
    watch_a = keel.watch(body, opt_a, policy="observe", detectors=adversarial_detectors())
    watch_b = keel.watch(other, opt_b, policy="observe", detectors=adversarial_detectors())
    losses = []
    for _ in range(3):
        x = torch.randn(16, 4, requires_grad=True)
        loss_a = checkpoint(body, x, use_reentrant=True).pow(2).mean()
        loss_a.backward()
        opt_a.step()
        opt_a.zero_grad()
        (other(x.detach()).pow(2).mean() + 10).backward()
        opt_b.step()
        opt_b.zero_grad()
        losses.append(loss_a.item())
    assert watch_a.guard.recorder._losses.tolist() == losses
    assert all(value >= 10 for value in watch_b.guard.recorder._losses.tolist())
    watch_a.close()
    watch_b.close()


def test_the_gan_warning_names_the_loops_own_line():
    """With two watches each ``backward()`` runs through two gates: the warning, at a fixed stack level, named a
    line of keel's watch.py instead of the loop's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dcgan("observe")
    [warning] = [w for w in caught if issubclass(w.category, KeelWarning)]
    assert warning.filename == __file__


def test_gradients_from_torch_autograd_backward_are_not_kept_past_the_update():
    """torch.autograd.backward(loss) is not the hooked Tensor.backward: the parameters its gradients land in were
    noted by the hooks and never read, one list entry per parameter per step for as long as the run went on."""
    model_a, model_b = nn.Linear(4, 1), nn.Linear(4, 1)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    watch_a = keel.watch(model_a, opt_a, policy="observe")
    watch_b = keel.watch(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), policy="observe")
    for _ in range(5):
        torch.autograd.backward(model_a(torch.randn(8, 4)).pow(2).mean())
        opt_a.step()
        opt_a.zero_grad()
    assert OWNERS._landed == []
    watch_a.close()
    watch_b.close()
