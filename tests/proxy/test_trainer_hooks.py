"""`TrainConfig`'s hooks — an LR factor per step, a batch function, a model edit, extra probes — which make the
one proxy trainer the scenario zoo's trainer too; and the config's plain-data description."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.proxy import ProxyBatches
from keel.proxy.trainer import TrainConfig, build_model, lr_lambda, train_proxy
from keel.signals.probe import StepContext

SMALL = dict(size="tiny", steps=3, batch_size=2, seq_len=16, warmup=1, eval_batches=1)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.integers(1, 500),
    warmup=st.integers(0, 50),
    ratio=st.floats(0.0, 1.0),
    factor=st.floats(1e-3, 1e3),
    step=st.integers(0, 600),
)
def test_lr_factor_multiplies_the_schedule_at_every_step(steps, warmup, ratio, factor, step):
    plain = lr_lambda(TrainConfig(steps=steps, warmup=warmup, min_lr_ratio=ratio))
    scaled = lr_lambda(TrainConfig(steps=steps, warmup=warmup, min_lr_ratio=ratio, lr_factor=lambda s: factor))
    assert scaled(step) == plain(step) * factor


def test_min_lr_ratio_one_keeps_the_lr_constant_after_warm_up():
    f = lr_lambda(TrainConfig(steps=100, warmup=10, min_lr_ratio=1.0))
    assert [f(s) for s in (0, 9)] == [0.1, 1.0]
    assert all(f(s) == 1.0 for s in range(10, 120))  # exactly: the cosine term is multiplied by 0


def test_batch_fn_sees_each_step_and_its_batch_and_replaces_it():
    seen = []
    fixed = ProxyBatches(batch_size=2, seq_len=16, seed=99).next()

    def replace_batch(step, batch):
        seen.append((step, batch))
        return fixed

    run = train_proxy(TrainConfig(**SMALL, batch_fn=replace_batch))
    expected = ProxyBatches(batch_size=2, seq_len=16, seed=0)
    assert [s for s, _ in seen] == [0, 1, 2]
    for _, (x, y) in seen:
        ex, ey = expected.next()
        assert torch.equal(x, ex) and torch.equal(y, ey)  # the trainer's own batch, in order
    assert run.losses != train_proxy(TrainConfig(**SMALL)).losses  # and it trained on the replacement


def test_model_fn_edits_the_model_and_only_trainable_parameters_are_optimized():
    def freeze_embeddings(model):
        model.tok_emb.requires_grad_(False)
        return model

    config = TrainConfig(**SMALL, model_fn=freeze_embeddings)
    run = train_proxy(config)
    before = build_model(config)  # the model the run started from
    assert torch.equal(run.model.tok_emb.weight, before.tok_emb.weight)  # frozen: not decayed, not stepped
    assert not torch.equal(run.model.head.weight, before.head.weight)


class _Counter:
    """A probe that counts its calls and evaluates the trainer's fixed-batch loss closure."""

    name = "counter"

    def __init__(self, loss):
        self.loss, self.losses = loss, []

    def measure(self, ctx: StepContext):
        self.losses.append(float(self.loss().detach()))
        return {"test/counter": torch.tensor(float(len(self.losses)))}

    def after_step(self, ctx: StepContext):
        return {}


def test_extra_probes_join_the_guards_probes_with_a_fixed_batch_loss():
    made = []

    def counter(model, loss):
        made.append(_Counter(loss))
        return made

    run = train_proxy(TrainConfig(**SMALL, extra_probes=counter), policy="observe")
    (probe,) = made
    assert len(probe.losses) == 3 and all(math.isfinite(v) for v in probe.losses)
    assert probe.losses[0] == pytest.approx(math.log(256), abs=0.1)  # the untrained model on a fixed batch
    assert [f for f in run.findings if f.kind == "keel_error"] == []  # the probe ran without error
    bare = train_proxy(TrainConfig(**SMALL, extra_probes=counter), policy=None)
    assert len(made) == 1 and bare.losses == run.losses  # no Guard, no probes; training unchanged


@pytest.mark.parametrize("hook", ["lr_factor", "batch_fn", "model_fn", "extra_probes"])
@pytest.mark.parametrize("value", [1, "step", (lambda: 1,)])
def test_a_hook_that_is_not_callable_is_one_clear_error(hook, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{hook}=.*; allowed: None or a function"):
        TrainConfig(**{hook: value})


def test_describe_is_json_and_names_the_hooks():
    def ramp(step):
        return 1.0

    # A config without hooks describes itself as before the hooks existed: a sweep store written then resumes.
    assert TrainConfig(size="tiny").describe() == {
        "size": "tiny",
        "steps": 300,
        "batch_size": 16,
        "seq_len": 64,
        "lr": 0.001,
        "warmup": 20,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.0,
        "beta2": 0.95,
        "qk_norm": False,
        "optimizer": "adamw",
        "z_loss": 0.0,
        "stabilize": (),
        "max_grad_norm": None,
        "eval_batches": 8,
        "seed": 0,
    }
    described = TrainConfig(size="tiny", lr_factor=ramp, batch_fn=lambda s, b: b).describe()
    assert described["lr_factor"].endswith("ramp") and "lambda" in described["batch_fn"]
    assert "model_fn" not in described and "extra_probes" not in described
    json.dumps(described)
