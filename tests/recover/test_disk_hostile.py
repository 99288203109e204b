"""Damaged and hostile disk snapshots: one clear warning each, naming the file and the reason, and never a crash,
a raw KeyError/TypeError/IndexError, or an unpickled object."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel import Guard, RecoveryConfig
from keel.recover import DiskSnapshots, SnapshotCorrupt, SnapshotRing, TrainingState
from keel.recover.disk_format import SnapshotInvalid, decode, encode, meta_checksum
from tests.conftest import TinyNet, make_batches


def _state():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for x, y in make_batches(2):
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return TrainingState(model=model, optimizer=opt, scheduler=sched)


def _save(directory, *steps):
    state, disk = _state(), DiskSnapshots(directory, keep=len(steps), run_id="c" * 32)
    for step in steps:
        ring = SnapshotRing()
        snap = ring.take(step, state)
        ring.fence()
        disk.save(snap)
    return disk


def _edit_meta(folder: Path, edit, *, recompute: bool = True) -> None:
    """Change meta.json as a hostile writer would: the edit, then (``recompute``) a matching meta checksum."""
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    if recompute and isinstance(meta, dict) and "meta_sha256" in meta:
        meta["meta_sha256"] = meta_checksum(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _first_tensor_ref(node):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found = _first_tensor_ref(child)
            if found is not None:
                return found
    return None


def _rng(meta):
    return dict(meta["plain"]["__dict__"])["rng"]["__dict__"]


def _set_rng(meta, name, value):
    for pair in _rng(meta):
        if pair[0] == name:
            pair[1] = value


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _symlink(path: Path) -> None:
    copy_ = path.with_name("elsewhere")
    shutil.copy(path, copy_)
    path.unlink()
    path.symlink_to(copy_)


# (name, damage of the newest snapshot's folder, the reason the warning must give)
HOSTILE = [
    ("no tensor checksum", lambda f: _edit_meta(f, lambda m: m.pop("sha256")), r"meta.json has no checksum"),
    (
        "checksum of the wrong type",
        lambda f: _edit_meta(f, lambda m: m.update(sha256=[1, 2])),
        r"checksum of the tensor file is not a SHA-256 hex digest",
    ),
    (
        "tensor file truncated",
        lambda f: (f / "tensors.safetensors").write_bytes((f / "tensors.safetensors").read_bytes()[:100]),
        r"tensors.safetensors is truncated \(100 of at least \d+ bytes\): "  # cut inside its header
        r"checksum mismatch",
    ),
    (
        "tensor file flipped",
        lambda f: _flip(f / "tensors.safetensors"),
        r"tensors.safetensors was changed after it was written: checksum mismatch",
    ),
    ("tensor file missing", lambda f: (f / "tensors.safetensors").unlink(), r"tensors.safetensors is missing"),
    ("tensor file a symlink", lambda f: _symlink(f / "tensors.safetensors"), r"tensors.safetensors is a symlink"),
    (
        "tensor file a FIFO",
        lambda f: ((f / "tensors.safetensors").unlink(), os.mkfifo(f / "tensors.safetensors")),
        r"tensors.safetensors is not a regular file",
    ),
    ("meta.json not JSON", lambda f: (f / "meta.json").write_text("{not json"), r"meta.json is not valid JSON"),
    (
        "meta.json cut short",
        lambda f: (f / "meta.json").write_bytes((f / "meta.json").read_bytes()[:50]),
        r"meta.json is not valid JSON",
    ),
    (
        "meta.json binary",
        lambda f: (f / "meta.json").write_bytes(b"\xff\xfe\x00garbage"),
        r"meta.json is not valid JSON",
    ),
    ("meta.json a list", lambda f: (f / "meta.json").write_text("[1, 2]"), r"meta.json holds a JSON list"),
    (
        "meta.json nested deeply",
        lambda f: (f / "meta.json").write_text("[" * 100_000 + "]" * 100_000),
        r"meta.json is (nested too deeply|not valid JSON)",
    ),
    ("meta.json missing", lambda f: (f / "meta.json").unlink(), r"meta.json is missing"),
    ("meta.json a symlink", lambda f: _symlink(f / "meta.json"), r"meta.json is a symlink"),
    (
        "meta.json edited, checksum kept",
        lambda f: _edit_meta(f, lambda m: m.update(created=0.0), recompute=False),
        r"meta.json was changed after it was written",
    ),
    ("step a string", lambda f: _edit_meta(f, lambda m: m.update(step="20")), r"step is '20'"),
    ("step huge", lambda f: _edit_meta(f, lambda m: m.update(step=10**30)), r"integer from 0 to"),
    (
        "step of another folder",
        lambda f: _edit_meta(f, lambda m: m.update(step=999)),
        r"says step 999 but the folder is step-000000020",
    ),
    ("no skeleton", lambda f: _edit_meta(f, lambda m: m.pop("skeleton")), r"meta.json has no 'skeleton'"),
    ("skeleton a number", lambda f: _edit_meta(f, lambda m: m.update(skeleton=3)), r"optimizer state is not"),
    (
        "reference to a tensor that is not there",
        lambda f: _edit_meta(f, lambda m: _first_tensor_ref(m["plain"]).update(__tensor__="nope")),
        r"refer to tensor 'nope'",
    ),
    (
        "an object array",
        lambda f: _edit_meta(
            f,
            lambda m: _set_rng(
                m, "numpy", {"__tuple__": ["MT19937", {"__ndarray__": [1, 2], "dtype": "object"}, 0, 0, 0.0]}
            ),
        ),
        r"array of dtype 'object'",
    ),
    (
        "a bad python RNG state",
        lambda f: _edit_meta(f, lambda m: _set_rng(m, "python", [1, 2])),
        r"python RNG state is not valid",
    ),
    (
        "an untagged object",
        lambda f: _edit_meta(f, lambda m: m.update(plain={"rng": 1})),
        r"an object keel does not write",
    ),
    ("run_id a number", lambda f: _edit_meta(f, lambda m: m.update(run_id=5)), r"run_id is 5"),
]


@pytest.mark.parametrize("name,damage,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_bad_newest_snapshot_is_skipped_with_one_warning_naming_the_file_and_the_reason(
    tmp_path, name, damage, reason
):
    disk = _save(tmp_path, 10, 20)
    damage(tmp_path / "step-000000020")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert disk.load_newest().step == 10
    [warning] = [w for w in caught if issubclass(w.category, SnapshotCorrupt)]
    assert "step-000000020" in str(warning.message)
    assert re.search(reason, str(warning.message)), str(warning.message)


def test_an_empty_snapshot_folder_is_named_and_skipped(tmp_path):
    disk = _save(tmp_path, 10)
    (tmp_path / "step-000000030").mkdir()
    with pytest.warns(SnapshotCorrupt, match=r"step-000000030: the metadata file meta.json is missing"):
        assert disk.load_newest().step == 10


def test_when_no_snapshot_is_usable_the_resume_says_it_starts_from_step_0(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        run_dir=str(tmp_path),
        policy="recover",
        recovery=RecoveryConfig(snapshot_every=2, disk_every=1, keep_on_disk=2),
    )
    for x, y in make_batches(6):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        guard.recovery.disk.wait()
    guard.close()
    snapshots = sorted((tmp_path / "snapshots").iterdir())
    assert len(snapshots) == 2
    for folder in snapshots:
        _flip(folder / "tensors.safetensors")
    model = TinyNet()
    with pytest.warns(SnapshotCorrupt) as caught:
        resumed = Guard(model, torch.optim.AdamW(model.parameters(), lr=1e-2), run_dir=str(tmp_path), resume=True)
    messages = [str(w.message) for w in caught]
    assert sum("checksum mismatch" in m for m in messages) == 2
    assert any("none of the 2 snapshots" in m and "starts from step 0" in m for m in messages), messages
    assert resumed.global_step == 0
    resumed.close()


# --- meta.json mutated at random ------------------------------------------------------------------------------
_BASE: dict = {}


def _base_folder() -> Path:
    if not _BASE:
        root = Path(tempfile.mkdtemp(prefix="keel-hostile-"))
        _save(root, 7)
        _BASE["folder"] = root / "step-000000007"
        _BASE["meta"] = json.loads((_BASE["folder"] / "meta.json").read_text())
    return _BASE["folder"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _mutate(data, meta):
    """Replace or delete one node of ``meta`` (a random walk down the tree) or add a key somewhere."""
    node, parent, key = meta, None, None
    while isinstance(node, (dict, list)) and node and data.draw(st.integers(0, 5)) > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if parent is None or action == "add":
        target = node if isinstance(node, dict) else meta
        tags = ["__tensor__", "__dict__", "__tuple__", "__ndarray__", "__dtype__", "dtype", "x"]
        tag = data.draw(st.sampled_from(tags))
        target[tag] = data.draw(JSON_VALUES)
    elif action == "delete":
        del parent[key]
    else:
        parent[key] = data.draw(JSON_VALUES)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a snapshot load unpickled something")

    for module, name in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), recompute=st.integers(0, 3), cut=st.integers(0, 4))
def test_a_mutated_meta_json_loads_or_is_refused_cleanly_and_never_unpickles(no_unpickling, data, recompute, cut):
    """Mostly a hostile writer (the meta checksum recomputed), sometimes a damaged file (checksum kept, or cut)."""
    base = _base_folder()
    meta = copy.deepcopy(_BASE["meta"])
    _mutate(data, meta)
    if recompute and "meta_sha256" in meta:
        meta["meta_sha256"] = meta_checksum(meta)
    text = json.dumps(meta)
    if cut == 0:
        text = text[: data.draw(st.integers(0, len(text)))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / base.name
        shutil.copytree(base, folder)
        (folder / "meta.json").write_text(text)
        try:
            snap = DiskSnapshots.load(folder)
        except SnapshotInvalid as exc:
            assert str(exc) and "Traceback" not in str(exc)
        else:
            assert snap.step == 7


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float, torch.int8, torch.bool, torch.float8_e4m3fn]
)
def test_a_torch_dtype_in_a_param_group_round_trips(dtype):
    # pytorch_optimizer's Kron keeps precondition_dtype=torch.float32 in each group: encode refused it ("cannot store
    # dtype … without pickling"), so no snapshot of such a run reached the disk and resume=True began at step 0
    tensors: dict = {}
    group = {"lr": 1e-3, "precondition_dtype": dtype, "params": [0, 1]}
    stored = json.loads(json.dumps(encode(group, tensors, "/s/param_groups/0")))
    assert decode(stored, tensors, "the optimizer state") == group and not tensors


@pytest.mark.parametrize("body", ["nope", "__class__", "cuda", "Tensor", "torch.float32", "", 3, None, ["float32"], {}])
def test_a_dtype_torch_does_not_have_is_refused_naming_it(body):
    with pytest.raises(SnapshotInvalid, match=r"hold a dtype .* that torch does not have"):
        decode({"__dtype__": body}, {}, "the optimizer state")
