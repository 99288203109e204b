"""A disk snapshot's two files damaged byte by byte — cut at a byte boundary (a kill or a full disk mid-copy), one
bit flipped (bad memory, a bad disk), bytes inserted or dropped — and a tensor file whose safetensors header a
hostile writer rewrote (both checksums recomputed). Each is refused with one `SnapshotInvalid` naming the file,
never loaded as something else and never a raw error; a meta.json change that does not change its content (a bit
of the ``meta_sha256`` key name) may load, and then loads exactly what was written. The exhaustive sweeps over
every byte are ``@pytest.mark.slow``; the default suite draws from the same damages with hypothesis."""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.recover import DiskSnapshots, SnapshotRing, TrainingState
from keel.recover.disk_format import META, TENSORS, SnapshotInvalid, file_sha256, meta_checksum, read_snapshot

_BASE: dict = {}
FOLDER = "step-000000007"


def _written() -> tuple[bytes, bytes, dict[str, torch.Tensor]]:
    """The tensor file, meta.json and tensors of one small snapshot (written once per process)."""
    if not _BASE:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        ring = SnapshotRing()
        snap = ring.take(7, state)
        ring.fence()
        folder = DiskSnapshots(tempfile.mkdtemp(prefix="keel-bytes-"), run_id="a" * 32).save(snap)
        _BASE.update(
            tensors=(folder / TENSORS).read_bytes(),
            meta=(folder / META).read_bytes(),
            loaded=read_snapshot(folder).tensors,
        )
        shutil.rmtree(folder.parent)
    return _BASE["tensors"], _BASE["meta"], _BASE["loaded"]


def _load(tensors: bytes, meta: bytes) -> object:
    """The snapshot read from a folder holding these two files, or the `SnapshotInvalid` it raised. (One folder,
    written over: a new folder per load cost 10 ms in removing it.)"""
    if "folder" not in _BASE:
        _BASE["folder"] = Path(tempfile.mkdtemp(prefix="keel-bytes-")) / FOLDER
        _BASE["folder"].mkdir()
    folder = _BASE["folder"]
    (folder / TENSORS).write_bytes(tensors)
    (folder / META).write_bytes(meta)
    try:
        return read_snapshot(folder)
    except SnapshotInvalid as exc:
        return exc


def _refused_or_the_same(result: object, which: str) -> None:
    if isinstance(result, SnapshotInvalid):
        assert str(result) and ("tensor file" in str(result) if which == TENSORS else "meta.json" in str(result))
        return
    assert which == META, "a damaged tensor file was loaded"
    original = _written()[2]
    assert result.step == 7 and result.tensors.keys() == original.keys()
    assert all(torch.equal(result.tensors[k], original[k]) for k in original)


def _damaged(which: str, damage) -> None:
    tensors, meta, _ = _written()
    if which == TENSORS:
        _refused_or_the_same(_load(damage(tensors), meta), which)
    else:
        _refused_or_the_same(_load(tensors, damage(meta)), which)


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


DAMAGES = {
    "cut": lambda data, i, bit: data[:i],
    "flip": lambda data, i, bit: _flip(data, i, bit),
    "insert": lambda data, i, bit: data[:i] + bytes([bit * 31]) + data[i:],
    "drop": lambda data, i, bit: data[:i] + data[i + 1 :],
}


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from([TENSORS, META]),
    kind=st.sampled_from(sorted(DAMAGES)),
    where=st.floats(0, 1, exclude_max=True),
    bit=st.integers(0, 7),
)
def test_a_damaged_byte_anywhere_is_refused_naming_the_file(which, kind, where, bit):
    size = len(_written()[0 if which == TENSORS else 1])
    _damaged(which, lambda data: DAMAGES[kind](data, int(where * size), bit))


@pytest.mark.slow
@pytest.mark.parametrize("which", [TENSORS, META])
def test_every_cut_and_every_flipped_byte_is_refused(which):
    size = len(_written()[0 if which == TENSORS else 1])
    for index in range(size):
        _damaged(which, lambda data, i=index: data[:i])
        _damaged(which, lambda data, i=index: _flip(data, i, i % 8))


def test_a_tensor_file_cut_inside_its_header_says_the_file_is_larger_than_the_header():
    tensors, meta, _ = _written()
    (length,) = struct.unpack("<Q", tensors[:8])
    cases = [(4, "4 of at least 8 bytes"), (20, f"20 of at least {8 + length} bytes")]
    cases.append((8 + length + 1, f"{8 + length + 1} of {len(tensors)} bytes"))
    for cut, says in cases:
        message = str(_load(tensors[:cut], meta))
        assert f"tensors.safetensors is truncated ({says}): checksum mismatch" in message, message


# --- a hostile writer: the safetensors header rewritten, both checksums recomputed ----------------------------
def _header(tensors: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", tensors[:8])
    return length, json.loads(tensors[8 : 8 + length])


def _rewritten(edit=None, *, length=None, raw=None, tail=b"") -> bytes:
    tensors = _written()[0]
    old_length, header = _header(tensors)
    if edit is not None:
        edit(header)
    body = json.dumps(header).encode() if raw is None else raw
    size = len(body) if length is None else length
    return struct.pack("<Q", size) + body + tensors[8 + old_length :] + tail


def _first(header: dict) -> dict:
    return header["model/weight"]


HOSTILE_TENSOR_FILES = [
    ("empty", lambda: b"", r"header too small"),
    ("header length 2**63", lambda: _rewritten(length=2**63), r"header too large"),
    ("header length big-endian", lambda: struct.pack(">Q", _header(_written()[0])[0]) + _written()[0][8:], r"header"),
    ("header length past the file", lambda: _rewritten(length=10**6), r"invalid header length"),
    ("header a JSON list", lambda: _rewritten(raw=b"[1, 2]"), r"invalid JSON in header"),
    ("header not JSON", lambda: _rewritten(raw=b"{nope"), r"invalid JSON in header"),
    ("offsets past the data", lambda: _rewritten(lambda h: _first(h).update(data_offsets=[0, 10**9])), r"offset"),
    ("unknown dtype", lambda: _rewritten(lambda h: _first(h).update(dtype="Q99")), r"unknown variant"),
    ("shape larger than its bytes", lambda: _rewritten(lambda h: _first(h).update(shape=[1000])), r"invalid shape"),
    (
        "overlapping tensors",
        lambda: _rewritten(lambda h: _first(h).update(data_offsets=h["model/bias"]["data_offsets"])),
        r"offset",
    ),
    ("a tensor left out of the header", lambda: _rewritten(lambda h: h.pop("model/bias")), r"invalid offset"),
    ("bytes after the last tensor", lambda: _rewritten(tail=b"garbage"), r"not fully covered"),
]


def _with_recomputed_checksums(tensors: bytes) -> bytes:
    meta = json.loads(_written()[1])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / TENSORS).write_bytes(tensors)
        meta["sha256"] = file_sha256(Path(tmp) / TENSORS)
    meta["meta_sha256"] = meta_checksum(meta)
    return json.dumps(meta).encode()


@pytest.mark.parametrize("name,tensors,reason", HOSTILE_TENSOR_FILES, ids=[h[0] for h in HOSTILE_TENSOR_FILES])
def test_a_rewritten_safetensors_header_is_refused_as_unreadable(name, tensors, reason):
    data = tensors()
    result = _load(data, _with_recomputed_checksums(data))
    assert isinstance(result, SnapshotInvalid), name
    assert "the tensor file tensors.safetensors cannot be read (SafetensorError" in str(result)
    assert re.search(reason, str(result)), str(result)


def test_foreign_safetensors_metadata_is_ignored():
    data = _rewritten(lambda h: h.update(__metadata__={"format": "np", "writer": "not keel"}))
    result = _load(data, _with_recomputed_checksums(data))
    _refused_or_the_same(result, META)  # the same tensors: the header's metadata is not keel's business
