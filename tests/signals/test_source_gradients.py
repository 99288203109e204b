"""The per-source gradient probe: names, grouping, cosines against an independent reference, cadence, no side effect."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel.signals import SourceGradientsConfig, SourceGradientsProbe
from keel.signals.source_gradients import group_mean, source_cosines, source_losses, source_names
from tests.signals.contexts import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _setup(seed: int = 0, n: int = 24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.1), nn.Linear(12, 3))
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    source = torch.arange(n) % 3
    return model, (x, y, source)


def _context(model, batch, step=0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = _loss_fn(model, batch).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    loss = _loss_fn(model, batch).mean()
    loss.backward()
    return step_context(model, opt, step=step, loss=loss, batch=batch), opt


def _probe(**fields):
    return SourceGradientsProbe(
        SourceGradientsConfig(source_fn=lambda b: b[2], loss_fn=_loss_fn, every=1, **fields)  # type: ignore[arg-type]
    )


def test_source_names_sanitise_and_keep_one_name_per_tag():
    assert source_names(["web", "code/py", "web", 3, "a b"], 5) == ["web", "code_py", "web", "3", "a_b"]
    assert source_names(torch.tensor([2, 0, 2]), 3) == ["2", "0", "2"]


@pytest.mark.parametrize(
    ("tags", "size", "match"),
    [
        (["a", "b"], 3, "2 tags for a batch of 3"),
        (["a b", "a_b"], 2, "both sanitise to 'a_b'"),
        ([str(i) for i in range(40)], 40, "40 distinct sources .* max_sources=32"),
    ],
)
def test_bad_tags_get_one_clear_error(tags, size, match):
    with pytest.raises(ValueError, match=match):
        source_names(tags, size)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=80), st.integers(-5, 5)), min_size=1, max_size=30))
def test_any_tags_give_slash_free_names_or_one_clear_error(tags):
    try:
        names = source_names(tags, len(tags))
    except ValueError as exc:
        assert "sanitise" in str(exc) or "max_sources" in str(exc)
        return
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", n) for n in names)
    same = {(a == b, names[i] == names[j]) for i, a in enumerate(tags) for j, b in enumerate(tags)}
    assert same <= {(True, True), (False, False)}  # same tag ⇔ same name


def test_group_mean_matches_a_plain_python_mean():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    got = {k: float(v) for k, v in group_mean(values, ["a", "b", "a", "c", "b"]).items()}
    assert got == {"a": 2.5, "b": 9.0, "c": 8.0}


def test_source_cosines_match_autograd_on_each_part_in_float64():
    model, batch = _setup(1)
    model = model.double().eval()
    batch = (batch[0].double(), batch[1], batch[2])
    names = source_names(batch[2], 24)
    got = source_cosines(model, _loss_fn, batch, names)
    params = list(model.parameters())

    def grad_of(mask):
        loss = _loss_fn(model, (batch[0][mask], batch[1][mask])).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    for s in ("0", "1", "2"):
        own = grad_of(batch[2] == int(s))
        rest = grad_of(batch[2] != int(s))
        expected = float(own @ rest / (own.norm() * rest.norm()))
        assert abs(float(got[s]) - expected) < 1e-5, s


def test_a_label_flipped_source_pulls_against_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    x = torch.randn(60, 6)
    y = (x[:, :3]).argmax(1)
    with torch.no_grad():  # a model that has learnt the rule: the clean sources' gradients agree
        model[0].weight.zero_()
        model[0].weight[:, :3] = torch.eye(3) * 0.5
    source = torch.arange(60) % 3
    y = torch.where(source == 2, (y + 1) % 3, y)
    got = source_cosines(model, _loss_fn, (x, y, source), source_names(source, 60))
    # the flipped source's gradient points against the rest; the clean ones' rest includes it, so theirs fall less
    assert float(got["2"]) < min(float(got["0"]), float(got["1"])) and float(got["2"]) < -0.25


def test_probe_emits_each_sources_keys_and_leaves_training_state_bit_identical():
    model, batch = _setup()
    ctx, opt = _context(model, batch)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    out = _probe(grad_norms=True).measure(ctx)
    families = (keys.SOURCE_LOSS_PER_SOURCE, keys.SOURCE_GRAD_NORM_PER_SOURCE, keys.SOURCE_GRAD_COS_PER_SOURCE)
    assert set(out) == {keys.per_param(f, s) for f in families for s in ("0", "1", "2")}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    for k, v in state["state"].items():
        assert all(torch.equal(t, opt.state_dict()["state"][k][f]) for f, t in v.items())


def test_per_source_loss_is_the_mean_of_its_examples_losses_in_eval_mode():
    model, batch = _setup()
    ctx, _ = _context(model, batch)
    out = _probe(cosine=False).measure(ctx)
    model.eval()
    with torch.no_grad():
        losses = _loss_fn(model, batch)
    for s in range(3):
        expected = float(losses[batch[2] == s].mean())
        assert abs(float(out[keys.per_param(keys.SOURCE_LOSS_PER_SOURCE, str(s))]) - expected) < 1e-6


def test_probe_measures_only_every_n_steps_and_only_what_is_asked():
    model, batch = _setup()
    probe = SourceGradientsProbe(source_fn=lambda b: b[2], loss_fn=_loss_fn, every=5)
    assert probe.measure(_context(model, batch, step=3)[0]) == {}
    out = probe.measure(_context(model, batch, step=10)[0])
    assert {k.rsplit("/", 1)[0] + "/" for k in out} == {keys.SOURCE_LOSS_PER_SOURCE, keys.SOURCE_GRAD_COS_PER_SOURCE}


def test_without_a_batch_or_functions_it_measures_nothing_and_warns_once():
    model, batch = _setup()
    ctx, _ = _context(model, batch)
    ctx.batch = None
    probe = _probe()
    with pytest.warns(KeelWarning, match="passed no batch"):
        assert probe.measure(ctx) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe.measure(ctx) == {}
    with pytest.warns(KeelWarning, match="no source_fn"):
        assert SourceGradientsProbe(every=1).measure(_context(model, batch)[0]) == {}


def test_one_source_in_the_batch_gives_no_cosine():
    model, batch = _setup()
    batch = (batch[0], batch[1], torch.zeros(24, dtype=torch.long))
    out = _probe().measure(_context(model, batch)[0])
    assert set(out) == {keys.per_param(keys.SOURCE_LOSS_PER_SOURCE, "0")}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"every": 0}, "every=0; allowed: an int >= 1"),
        ({"max_sources": 1}, "max_sources=1; allowed: an int >= 2"),
        ({"source_fn": "tags"}, "source_fn='tags'; allowed: a callable or None"),
        ({"grad_norms": "yes"}, "grad_norms='yes'"),
    ],
)
def test_bad_config_names_the_field_and_what_is_allowed(fields, match):
    with pytest.raises(ValueError, match=re.escape(f"SourceGradientsConfig.{match}")):
        SourceGradientsConfig(**fields)


# --- source_losses: the loop's own per-example losses, per source, for guard.step(loss, signals=...) ---------------
@settings(max_examples=15, deadline=None, derandomize=True)
@given(tags=st.lists(st.sampled_from(["web", "code", 3, "a/b"]), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_source_losses_are_each_sources_mean_and_count(tags, seed):
    losses = torch.rand(len(tags), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = source_losses(losses, tags)
    for tag in set(tags):
        name = source_names([tag], 1)[0]
        mine = [float(v) for v, t in zip(losses, tags, strict=True) if t == tag]
        assert float(got[keys.per_param(keys.SOURCE_STEP_LOSS_PER_SOURCE, name)]) == pytest.approx(
            sum(mine) / len(mine)
        )
        assert got[keys.per_param(keys.SOURCE_STEP_COUNT_PER_SOURCE, name)] == len(mine)
    assert len(got) == 2 * len(set(tags))


def test_source_losses_keep_the_means_on_the_device_and_off_the_graph():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True) * 2
    got = source_losses(losses, torch.tensor([0, 1, 0]))
    mean = got[keys.per_param(keys.SOURCE_STEP_LOSS_PER_SOURCE, "0")]
    assert isinstance(mean, torch.Tensor) and mean.dim() == 0 and not mean.requires_grad and float(mean) == 5.0


@pytest.mark.parametrize(
    ("losses", "tags", "match"),
    [
        (torch.ones(2, 3), [0, 1], "allowed: a 1-d tensor, one loss per example"),
        ([1.0, 2.0], [0, 1], "allowed: a 1-d tensor"),
        (torch.tensor(1.0), [0], "allowed: a 1-d tensor"),
        (torch.ones(3), [0, 1], "one tag per example"),
        (torch.ones(2), ["a/b", "a_b"], "sanitise to"),
    ],
)
def test_source_losses_refuse_bad_input_with_one_clear_error(losses, tags, match):
    with pytest.raises(ValueError, match=match):
        source_losses(losses, tags)
