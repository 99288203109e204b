"""The loop contract: observe is bit-identical, skips are recorded, errors never kill training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel import Guard, TrainingAborted
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches


def _train(
    policy: str | None,
    steps: int = 30,
    *,
    poison: dict[int, str] | None = None,
    scaler=None,
    accumulate: int = 1,
    run_dir=None,
    **guard_kwargs,
):
    """A plain loop (AdamW + StepLR); ``poison`` maps step → 'nan' (a NaN in fc1's gradient) or 'spike'."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    guard = Guard(model, opt, sched, policy=policy, scaler=scaler, run_dir=run_dir, **guard_kwargs) if policy else None
    batches = make_batches(steps * accumulate)
    losses, decisions = [], []
    for step in range(steps):
        for micro in range(accumulate):
            x, y = batches[step * accumulate + micro]
            if poison and poison.get(step) == "spike":
                y = y * 30.0
            loss = F.mse_loss(model(x), y) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        if poison and poison.get(step) == "nan":
            model.fc1.weight.grad[0, 0] = float("nan")
        if guard:
            decisions.append(guard.step(loss * accumulate))
        else:
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if guard:
        guard.close()
    return model, opt, sched, losses, decisions, guard


def _assert_same(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        assert torch.equal(pa, pb), na


def test_observe_is_bit_identical_to_the_bare_loop():
    bare = _train(None, steps=40)
    observed = _train("observe", steps=40, probes="full", log_every=3)
    _assert_same(bare[0], observed[0])
    assert bare[3] == observed[3]
    for k, v in bare[1].state_dict()["state"].items():
        for field in v:
            assert torch.equal(v[field], observed[1].state_dict()["state"][k][field])
    assert bare[2].get_last_lr() == observed[2].get_last_lr()


def test_observe_is_bit_identical_on_the_proxy_model():
    from keel.proxy.trainer import TrainConfig, train_proxy

    cfg = TrainConfig(size="tiny", steps=25, eval_batches=1)
    assert train_proxy(cfg).losses == train_proxy(cfg, policy="observe", probes="full", log_every=5).losses


def test_nan_gradient_is_skipped_and_the_parameter_named(tmp_path):
    model, opt, sched, losses, decisions, guard = _train("skip", poison={12: "nan"}, run_dir=tmp_path)
    assert [d.step for d in decisions if d.action != "ok"] == [12]
    d = decisions[12]
    assert d.action == "skip" and "non_finite" in d.reason
    [f] = [f for f in d.findings if f.kind == "non_finite"]
    assert f.evidence["parameters"] == ["fc1.weight"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with RunReader(tmp_path) as r:
        assert [(x.step, x.action) for x in r.decisions()] == [(12, "skip")]
        assert r.findings(min_severity="critical")[0].evidence["parameters"] == ["fc1.weight"]
        steps, values = r.signal("grad/norm/fc1.weight")
        assert 12 in steps.tolist() and math.isnan(values[steps.tolist().index(12)])


def test_skip_does_not_advance_optimizer_or_scheduler():
    *_, sched, _, decisions, guard = _train("skip", steps=10, poison={4: "nan"})
    opt = guard.optimizer
    assert opt.state_dict()["state"][0]["step"].item() == 9  # 10 calls, 1 skipped
    assert sched.last_epoch == 9


def test_observe_records_the_nan_but_still_steps():
    model, *_, decisions, guard = _train("observe", steps=15, poison={5: "nan"})
    assert decisions[5].action == "ok"
    assert any(f.kind == "non_finite" and f.step == 5 for f in guard.findings)
    assert not torch.isfinite(model.fc1.weight).all()  # exactly what the bare loop does


def test_injected_loss_spike_is_detected_at_that_step():
    *_, decisions, guard = _train("skip", steps=60, poison={45: "spike"})
    spikes = [f for f in guard.findings if f.kind == "loss_spike"]
    assert spikes and spikes[0].step == 45 and spikes[0].severity == "critical"
    assert decisions[45].action == "skip"
    assert [d.step for d in decisions if d.action != "ok"] == [45]


def test_consecutive_skips_escalate_to_abort_with_a_clear_message(tmp_path):
    poison = {s: "nan" for s in range(10, 20)}
    with pytest.raises(TrainingAborted, match="3 consecutive steps needed a skip") as info:
        _train("skip", steps=20, poison=poison, max_consecutive_skips=2, run_dir=tmp_path)
    assert info.value.decision.action == "abort"
    with RunReader(tmp_path) as r:
        assert [(d.step, d.action) for d in r.decisions()] == [(10, "skip"), (11, "skip"), (12, "abort")]
        assert r.meta()["status"] == "aborted"


def test_gradient_accumulation_matches_bare_under_observe():
    bare = _train(None, steps=12, accumulate=3)
    observed = _train("observe", steps=12, accumulate=3)
    _assert_same(bare[0], observed[0])


def test_grad_scaler_overflow_is_the_scalers_skip_not_keels():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    *_, decisions, guard = _train("skip", steps=12, poison={6: "nan"}, scaler=scaler)
    d = decisions[6]
    assert (d.action, d.by) == ("skip", "scaler")
    assert guard.escalation.consecutive_skips == 0
    assert [(f.kind, f.severity) for f in d.findings] == [
        ("loss_scale_overflow", "info"),
        ("non_finite_origin", "info"),
    ]
    assert scaler.get_scale() == 2.0**9  # halved once by the scaler, not touched by keel


def test_grad_scaler_observe_matches_bare():
    bare = _train(None, steps=10, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), poison={3: "nan"})
    obs = _train("observe", steps=10, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), poison={3: "nan"})
    _assert_same(bare[0], obs[0])


def test_param_groups_and_frozen_parameters(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    model.fc2.bias.requires_grad_(False)
    opt = torch.optim.SGD(
        [{"params": [model.fc1.weight, model.fc1.bias], "lr": 0.1}, {"params": [model.fc2.weight], "lr": 0.01}]
    )
    with Guard(model, opt, policy="skip", run_dir=tmp_path) as guard:
        x, y = make_batches(1)[0]
        F.mse_loss(model(x), y).backward()
        guard.step(F.mse_loss(model(x), y))
    assert "fc2.bias" not in [n for n, _ in guard.named]
    with RunReader(tmp_path) as r:
        assert r.signal("lr")[1].tolist() == [0.1] and r.signal("lr/1")[1].tolist() == [0.01]
        keys = r.signal_keys()
        assert "grad/norm/fc2.weight" in keys and "grad/norm/fc2.bias" not in keys


def test_max_grad_norm_clips_like_clip_grad_norm():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    guard = Guard(b, opt_b, max_grad_norm=0.01)
    x, y = make_batches(1)[0]
    F.mse_loss(a(x), y).backward()
    torch.nn.utils.clip_grad_norm_(a.parameters(), 0.01)
    opt_a.step()
    loss = F.mse_loss(b(x), y)
    loss.backward()
    guard.step(loss)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


class _BrokenProbe:
    name = "broken"

    def measure(self, ctx):
        raise RuntimeError("probe bug")

    def after_step(self, ctx):
        return {}


def test_probe_exception_is_a_finding_and_training_goes_on(tmp_path):
    from keel.signals import create_probe

    bare = _train(None, steps=8)
    model, *_, decisions, guard = _train(
        "skip", steps=8, run_dir=tmp_path, probes=[create_probe("loss"), create_probe("grad_norm"), _BrokenProbe()]
    )
    _assert_same(bare[0], model)
    errors = [f for f in guard.findings if f.kind == "keel_error"]
    assert len(errors) == 1 and errors[0].signal == "broken" and "probe bug" in errors[0].cause
    with RunReader(tmp_path) as r:
        assert len(r.signal("loss")[0]) == 8  # the other probes kept working
        assert [f.kind for f in r.findings()] == ["keel_error"]


class _BrokenDetector:
    name = "broken"

    def update(self, obs):
        raise ZeroDivisionError("detector bug")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_detector_exception_never_kills_training():
    bare = _train(None, steps=6)
    model, *_, guard = _train("skip", steps=6, detectors=[_BrokenDetector()])
    _assert_same(bare[0], model)
    assert [f.kind for f in guard.findings] == ["keel_error"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(policy="yolo"), r"policy='yolo'; allowed: observe, skip, recover"),
        (dict(log_every=0), r"log_every=0; allowed"),
        (dict(probes="most"), r"probes=.most.; allowed: default, transformer, full"),
        (dict(probes=["nope"]), r"unknown probe 'nope'; allowed"),
        (dict(max_grad_norm=-1.0), r"max_grad_norm=-1.0"),
        (dict(max_consecutive_skips=0), r"max_consecutive_skips=0"),
    ],
)
def test_bad_arguments_name_the_value_and_the_allowed(kwargs, match):
    model = TinyNet()
    with pytest.raises(ValueError, match=match):
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="has 0 parameters, none trainable; allowed"):
        Guard(nn.ReLU(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))


def test_non_scalar_loss_is_rejected():
    model = TinyNet()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"loss has shape \(16, 4\); allowed: a scalar"):
        guard.step(model(torch.zeros(16, 8)))
    with pytest.raises(ValueError, match="loss=str"):
        guard.step("1.0")


def test_float_loss_and_context_manager(tmp_path):
    model = TinyNet()
    with keel.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path) as guard:
        F.mse_loss(model(torch.zeros(2, 8)), torch.zeros(2, 4)).backward()
        assert guard.step(0.5).action == "ok"
    with RunReader(tmp_path) as r:
        meta = r.meta()
        assert meta["status"] == "finished" and meta["steps"] == 1
        assert meta["versions"]["torch"] == torch.__version__
        assert meta["model"]["parameters"] == sum(p.numel() for p in model.parameters())
        assert r.signal("loss")[1].tolist() == [0.5]
