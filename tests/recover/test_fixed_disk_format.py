"""The ``fixed`` entry of a disk snapshot's meta.json: what keel writes loads, anything else is one clear
`SnapshotInvalid`, and a snapshot written before keel left parameters out (no ``fixed``) still loads and restores."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.recover import DiskSnapshots, SnapshotRing, TrainingState, restore
from keel.recover.disk_format import SnapshotInvalid, meta_checksum
from tests.conftest import TinyNet, make_batches


def _state(frozen: bool = True):
    torch.manual_seed(0)
    model = TinyNet()
    model.fc1.requires_grad_(not frozen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in make_batches(2):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return TrainingState(model=model, optimizer=opt)


_BASE: dict = {}


def _base() -> tuple[Path, dict]:
    """One snapshot of TinyNet with fc1 frozen (fc1.weight and fc1.bias listed under ``fixed``), written once."""
    if not _BASE:
        root = Path(tempfile.mkdtemp(prefix="keel-fixed-"))
        ring = SnapshotRing(background=False)
        DiskSnapshots(root).save(ring.take(3, _state()))
        _BASE["folder"] = root / "step-000000003"
        _BASE["meta"] = json.loads((_BASE["folder"] / "meta.json").read_text())
    return _BASE["folder"], _BASE["meta"]


def _load_with(fixed_value=None, *, drop: bool = False):
    folder, meta = _base()
    meta = copy.deepcopy(meta)
    if drop:
        del meta["fixed"]
    else:
        meta["fixed"] = fixed_value
    meta["meta_sha256"] = meta_checksum(meta)
    with tempfile.TemporaryDirectory() as tmp:
        copy_ = Path(tmp) / folder.name
        shutil.copytree(folder, copy_)
        (copy_ / "meta.json").write_text(json.dumps(meta))
        return DiskSnapshots.load(copy_)


def test_keel_lists_the_frozen_parameters_under_fixed_and_loads_them_back():
    _, meta = _base()
    rows = meta["fixed"]["tensors"]
    assert meta["fixed"]["checksum"] == "crc32"
    assert [r[:3] for r in rows] == [["model/fc1.weight", [16, 8], "float32"], ["model/fc1.bias", [16], "float32"]]
    snap = _load_with(meta["fixed"])
    assert list(snap.fixed) == ["model/fc1.weight", "model/fc1.bias"] and snap.fixed["model/fc1.bias"].checksum
    assert "model/fc1.weight" not in snap.tensors


def test_a_snapshot_without_fixed_written_by_an_earlier_keel_loads_and_restores_every_parameter(tmp_path):
    state = _state(frozen=False)
    disk = DiskSnapshots(tmp_path)
    folder = disk.save(SnapshotRing(background=False).take(3, state))
    meta = json.loads((folder / "meta.json").read_text())
    del meta["fixed"]  # as every snapshot keel wrote before it left parameters out
    meta["meta_sha256"] = meta_checksum(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    snap = disk.load(folder)
    assert snap.fixed == {} and "model/fc1.weight" in snap.tensors
    fresh = _state(frozen=True)
    with torch.no_grad():
        fresh.model.fc1.weight.add_(1.0)
    restore(fresh, snap.tensors, snap.skeleton, snap.plain, resume=True, fixed=snap.fixed)
    assert torch.equal(fresh.model.fc1.weight, state.model.fc1.weight)


ROW = ["model/fc1.bias", [16], "float32", "0123abcd"]
HOSTILE = [
    ("a list", [], r"the fixed parameters are \[\]"),
    ("another checksum", {"checksum": "md5", "tensors": []}, r"keel writes \{\"checksum\": \"crc32\""),
    ("rows not a list", {"checksum": "crc32", "tensors": {}}, r"the fixed parameters are"),
    ("a short row", {"checksum": "crc32", "tensors": [ROW[:3]]}, r"is not \[\"model/<name>\""),
    ("not a model key", {"checksum": "crc32", "tensors": [["optim/0/exp_avg", *ROW[1:]]]}, "is not"),
    ("a negative dim", {"checksum": "crc32", "tensors": [[ROW[0], [-1], *ROW[2:]]]}, "is not"),
    ("a bool dim", {"checksum": "crc32", "tensors": [[ROW[0], [True], *ROW[2:]]]}, "is not"),
    ("too many elements", {"checksum": "crc32", "tensors": [[ROW[0], [2**62, 2**62], *ROW[2:]]]}, "is not"),
    ("too many dims", {"checksum": "crc32", "tensors": [[ROW[0], [1] * 65, *ROW[2:]]]}, "is not"),
    ("no dtype", {"checksum": "crc32", "tensors": [[*ROW[:2], "nofloat", ROW[3]]]}, "is not"),
    ("a torch name, not a dtype", {"checksum": "crc32", "tensors": [[*ROW[:2], "Tensor", ROW[3]]]}, "is not"),
    ("a long checksum", {"checksum": "crc32", "tensors": [[*ROW[:3], "0" * 64]]}, "is not"),
    ("an upper-case checksum", {"checksum": "crc32", "tensors": [[*ROW[:3], "0123ABCD"]]}, "is not"),
    ("a stored tensor", {"checksum": "crc32", "tensors": [["model/fc2.bias", [4], "float32", "0" * 8]]}, "stored"),
    ("listed twice", {"checksum": "crc32", "tensors": [ROW, ROW]}, "listed once already"),
]


@pytest.mark.parametrize(("fixed", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_fixed_entry_is_one_clear_snapshot_invalid(fixed, reason):
    with pytest.raises(SnapshotInvalid, match=reason):
        _load_with(fixed)


ROWS = st.lists(
    st.one_of(st.just(ROW), st.lists(st.one_of(st.text(max_size=6), st.integers(-3, 3), st.lists(st.integers(-2, 9)))))
)


@pytest.mark.slow  # ~1 s; the table above is the fast check of the same claim
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    value=st.one_of(
        st.none(), st.text(max_size=5), st.fixed_dictionaries({"checksum": st.just("crc32"), "tensors": ROWS})
    )
)
def test_any_fixed_entry_loads_or_is_refused_cleanly(value):
    try:
        snap = _load_with(value)
    except SnapshotInvalid as exc:
        assert str(exc).startswith("meta.json")
    else:
        assert snap.step == 3 and snap.tensors.keys().isdisjoint(snap.fixed)
