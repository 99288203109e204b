"""Checkpoints of a stabilized model: the record of its stabilizers, resuming and sampling with load_stabilized."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from keel.nn import create_stabilizer, list_stabilizers, load_stabilized, stabilize, stabilize_record
from keel.nn._record import entry_of, stabilizers_of
from tests.nn._models import NanoGPT, lm_loss

DOC = Path(__file__).parents[2] / "docs" / "stabilize.md"


def _ids(n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (2, 12), generator=gen) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, result, batches: list[torch.Tensor]) -> list[float]:
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids) + result.z_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _saved(checkpoint: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # the record is plain data: no pickled code to trust


def test_resuming_a_stabilized_checkpoint_continues_bit_identically() -> None:
    # Two stabilize calls, an optimizer whose weight decay makes stabilize add a no-decay group, σReparam's
    # power-iteration buffers and RMS QK-norm: the fresh model must rebuild all of it in the same order.
    torch.manual_seed(0)
    model = NanoGPT(bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    stabilize(model, ["sigma_reparam"], optimizer=opt)
    result = stabilize(model, [create_stabilizer("qk_norm", norm="rms"), "z_loss"], optimizer=opt)
    batches = _ids()
    _train(model, opt, result, batches[:3])
    checkpoint = _saved(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "stabilize": stabilize_record(model)}
    )
    expected = _train(model, opt, result, batches[3:])

    torch.manual_seed(1)  # another init: everything that matters comes from the checkpoint
    fresh = NanoGPT(bias=False)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    resumed = load_stabilized(fresh, checkpoint["model"], checkpoint["stabilize"], optimizer=fresh_opt)
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    assert len(fresh_opt.param_groups) == len(opt.param_groups) == 2
    assert _train(fresh, fresh_opt, resumed, batches[3:]) == expected


def test_sampling_a_plain_model_stabilized_again_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    stabilizers = ["qk_norm", "sigma_reparam", "z_loss"]
    result = stabilize(model, stabilizers, optimizer=(opt := torch.optim.AdamW(model.parameters(), lr=1e-2)))
    _train(model, opt, result, _ids(3))
    state = model.state_dict()
    ids = torch.randint(0, 50, (2, 12))
    expected = model.eval()(ids)
    # Either re-apply the same stabilizers before load_state_dict ...
    again = NanoGPT()
    stabilize(again, stabilizers)
    again.load_state_dict(state)
    torch.testing.assert_close(again.eval()(ids), expected, rtol=0, atol=0)
    # ... or let the record do it.
    plain = NanoGPT()
    load_stabilized(plain, state, stabilize_record(model))
    torch.testing.assert_close(plain.eval()(ids), expected, rtol=0, atol=0)


def test_the_record_is_plain_data_in_application_order() -> None:
    model = NanoGPT()
    stabilize(model, ["sigma_reparam"])
    stabilize(model, [create_stabilizer("qk_norm", norm="rms"), "z_loss"])
    stabilize(model, ["z_loss"])  # the hook is already there: nothing new to record
    with pytest.warns(UserWarning, match="matched nothing"):
        stabilize(model, ["scale_long"])  # matched nothing: not recorded
    record = stabilize_record(model)
    assert record == [
        {"stabilizer": "sigma_reparam", "stats_only": False, "exclude": []},
        {"stabilizer": "qk_norm", "norm": "rms", "eps": 1e-5, "bias": None},
        {"stabilizer": "z_loss", "coefficient": 1e-4, "head": None},
    ]
    assert json.loads(json.dumps(record)) == record
    record.clear()  # a copy: the model's own record is unchanged
    assert len(stabilize_record(model)) == 3
    assert stabilize_record(NanoGPT()) == []


def test_every_stabilizer_round_trips_through_its_record() -> None:
    # Contract over the registry: a stabilizer whose options do not survive the record fails here.
    for name, _, _ in list_stabilizers():
        required = {"scale_long": {"mode": "calibrated", "tokens": 6}, "dense_to_sparse": {"hard_step": 100}}
        stabilizer = create_stabilizer(name, **required.get(name, {}))
        entry = entry_of(stabilizer)
        assert entry["stabilizer"] == name
        assert stabilizers_of(json.loads(json.dumps([entry]))) == [stabilizer]


def test_a_record_saved_before_the_rename_names_its_stabilizers_under_remedy_and_still_loads() -> None:
    # keel wrote {"remedy": name, ...} before its surgery protocol was called "stabilizer"; such records are
    # saved next to checkpoints, so they keep loading.
    model = NanoGPT()
    stabilize(model, [create_stabilizer("qk_norm", norm="rms"), "z_loss"])
    old_record = [{"remedy": e.pop("stabilizer"), **e} for e in stabilize_record(model)]
    assert old_record[0] == {"remedy": "qk_norm", "norm": "rms", "eps": 1e-5, "bias": None}
    fresh = NanoGPT()
    load_stabilized(fresh, model.state_dict(), old_record)
    assert stabilize_record(fresh) == stabilize_record(model)  # recorded again under today's key


def test_a_stabilized_checkpoint_into_a_plain_model_is_one_clear_error() -> None:
    model = NanoGPT()
    stabilize(model, ["qk_norm", "sigma_reparam"])
    state = model.state_dict()
    plain = NanoGPT()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_stabilized(plain, state, [])
    message = str(error.value)
    assert "\n" not in message
    # 2 layers × q/k × gain/bias, and σReparam's original/u/sigma/gamma for 2 layers × c_attn/c_proj ...
    assert re.search(r"has 24 keys the model does not \(attn\.0\.c_attn\.parametrizations", message)
    # ... in place of the plain weights.
    assert re.search(r"lacks 4 keys the model has \(attn\.0\.c_attn\.weight", message)
    assert "saved from a model changed by keel.stabilize" in message
    assert "keel.nn.stabilize_record(model)" in message
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # nothing was loaded


def test_a_record_that_does_not_match_the_checkpoint_is_one_clear_error() -> None:
    model = NanoGPT()
    stabilize(model, [create_stabilizer("qk_norm", norm="rms")])  # RMS QK-norm: gains only
    state = model.state_dict()
    expected = (
        r"after re-applying \[qk_norm\]: it lacks 4 keys the model has \(attn\.0\.q_norm\.bias.*"
        r"the record lists stabilizers or options the state_dict was not saved with"
    )
    with pytest.raises(ValueError, match=expected):
        load_stabilized(NanoGPT(), state, [{"stabilizer": "qk_norm"}])


def test_an_already_stabilized_model_loads_when_the_record_agrees() -> None:
    model = NanoGPT()
    stabilize(model, ["qk_norm"])
    record, state = stabilize_record(model), model.state_dict()
    target = NanoGPT()
    stabilize(target, ["qk_norm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second application, so no "matched nothing" warning
        load_stabilized(target, state, record)
    with pytest.raises(ValueError, match=r"already stabilized with \[qk_norm\]; allowed: a freshly built model"):
        load_stabilized(target, state, [{"stabilizer": "z_loss"}])


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ("qk_norm", r"record='qk_norm'; allowed: a list of dicts"),
        ({"stabilizer": "qk_norm"}, r"allowed: a list of dicts"),
        (["qk_norm"], r"record\[0\]='qk_norm'; allowed: a dict"),
        ([{}], r"record\[0\]=\{\} has no 'stabilizer'"),
        ([{"stabilizer": 3}], r"record\[0\]\['stabilizer'\]=3; allowed: one of .*qk_norm"),
        ([{"stabilizer": "qk-norm"}], r"record\[0\]\['stabilizer'\]='qk-norm'; allowed: one of .*qk_norm"),
        ([{"stabilizer": "qk_norm", "kind": "rms"}], r"record\[0\] option 'kind'; allowed: norm, eps, bias"),
        ([{"stabilizer": "z_loss"}, {"stabilizer": "qk_norm", "eps": -1}], r"record\[1\]: QKNormStabilizer.eps=-1"),
        ([{"stabilizer": "z_loss", "head": 7}], r"record\[0\]: ZLossStabilizer.head=7"),
        ([{"remedy": "qk-norm"}], r"record\[0\]\['remedy'\]='qk-norm'; allowed: one of .*qk_norm"),
        ([{"stabilizer": "qk_norm", "remedy": "qk_norm"}], r"record\[0\] option 'remedy'; allowed: norm, eps, bias"),
    ],
)
def test_a_bad_record_raises_one_error_naming_it_and_leaves_the_model_alone(record, match) -> None:
    model = NanoGPT()
    with pytest.raises(ValueError, match=match):
        load_stabilized(model, model.state_dict(), record)
    assert stabilize_record(model) == [] and not model.lm_head._forward_hooks


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_OPTIONS = st.sampled_from(
    [
        "norm",
        "eps",
        "bias",
        "coefficient",
        "head",
        "stats_only",
        "exclude",
        "kappa",
        "mode",
        "tokens",
        "reduction",
        "blocks",
    ]
)
_ENTRY = st.builds(
    lambda name, options: {**options, "stabilizer": name},
    st.sampled_from([name for name, _, _ in list_stabilizers()]) | _JSON,
    st.dictionaries(_OPTIONS, _JSON, max_size=2),
)


@settings(max_examples=80, deadline=None)
@given(record=st.lists(_ENTRY, max_size=3) | _JSON)
def test_any_record_either_loads_or_raises_value_error(record) -> None:
    model = NanoGPT(n_layer=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_stabilized(model, model.state_dict(), record)
    except ValueError as error:
        assert "\n" not in str(error)


def test_the_docs_checkpoint_example_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, f"{DOC} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the repository's own documentation
