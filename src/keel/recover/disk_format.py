"""The disk snapshot format, and the checks that turn a damaged or hostile snapshot folder into one clear reason.

A snapshot folder holds ``tensors.safetensors`` (every tensor) and ``meta.json``::

    {"step": 120, "created": 1.7e9, "run_id": "<32 hex digits>", "skeleton": …, "plain": …,
     "fixed": {"checksum": "crc32", "tensors": [["model/<name>", [4096, 4096], "bfloat16", "<8 hex digits>"], …]},
     "sha256": "<SHA-256 of the tensor file>", "meta_sha256": "<SHA-256 of the rest of meta.json>"}

``skeleton`` (the optimizer's ``state_dict`` with tensors replaced by their keys) and ``plain`` (scheduler, scaler,
component, history, data and RNG states) are plain data in a tagged JSON form — ``{"__tensor__": key}`` for a
tensor of the safetensors file, ``{"__tuple__": […]}``, ``{"__dict__": [[key, value], …]}`` and
``{"__ndarray__": […], "dtype": "uint32"}``, ``{"__dtype__": "float32"}`` for a torch dtype (a param group's
setting) — so loading reads JSON and safetensors only and never unpickles.
``fixed`` lists the parameters left out because training cannot change them (`keel.recover.fixed`); a snapshot
written before keel left any out has no ``fixed`` and holds every parameter.

`read_snapshot` verifies both checksums and the structure keel relies on (types, tensor references, the RNG
states, the step) before anything is used; what fails is one `SnapshotInvalid` whose message says, in words,
which file is wrong and how ("meta.json has no checksum", "the tensor file is truncated: checksum mismatch").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from keel.recover.actions import HISTORY_KEY, LEGACY_HISTORY_KEY
from keel.recover.fixed import CHECKSUM, FixedTensor
from keel.recover.snapshot import Snapshot
from keel.recover.state import without_compile_prefix

TENSORS, META = "tensors.safetensors", "meta.json"
MAX_STEP = 2**63 - 1  # the run store keeps steps as SQLite integers
MAX_META_BYTES = 1 << 30  # a real meta.json is kilobytes to megabytes
MAX_DIMS = 64  # the most dimensions a torch tensor has
_HEX = frozenset("0123456789abcdef")
# torch's dtypes by name, read from the module's own namespace (no attribute lookup: torch imports lazily on some)
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_ARRAY_KINDS = frozenset("biuf")  # numeric NumPy arrays only: an object array is a door to arbitrary objects


class SnapshotInvalid(ValueError):
    """A snapshot folder that cannot be used; the message is the reason, in words."""


# --- writing ------------------------------------------------------------------------------------------------------
def encode(value: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """Plain data → JSON, moving tensors into ``tensors`` (stored in the safetensors file)."""
    if isinstance(value, Tensor):
        key = f"plain{path}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, torch.dtype):  # a setting in a param group (pytorch_optimizer's Kron: precondition_dtype)
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"cannot store a dict with keys {list(value)[:3]} at {path or '/'}")
        return {"__dict__": [[k, encode(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path or '/'} without pickling")


def meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its own ``meta_sha256`` entry (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading ------------------------------------------------------------------------------------------------------
def read_snapshot(folder: str | Path) -> Snapshot:
    """Load the snapshot in ``folder`` after checking everything keel relies on.

    Raises:
        SnapshotInvalid: The folder is not a usable snapshot; the message names the file and the reason.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        tensors = _read_tensors(folder / TENSORS, meta["sha256"])
    except OSError as exc:  # it went away or became unreadable while being read
        raise SnapshotInvalid(f"the tensor file {TENSORS} cannot be read ({exc.strerror or exc})") from None
    try:
        skeleton = decode(meta["skeleton"], tensors, "the optimizer state")
        plain = decode(meta["plain"], tensors, "the small states")
    except RecursionError:
        raise SnapshotInvalid("meta.json is nested too deeply to be keel's") from None
    _check_skeleton(skeleton, tensors)
    _check_plain(plain)
    _upgrade_history(plain)
    fixed = without_compile_prefix(_fixed(meta.get("fixed"), tensors))
    tensors = without_compile_prefix(tensors)
    snap = Snapshot(
        step=meta["step"], tensors=tensors, skeleton=skeleton, plain=plain, created=meta["created"], fixed=fixed
    )
    snap.ready.set()
    return snap


def snapshot_step(folder: Path) -> int | None:
    """The step in a folder name ``step-<N>``; None for any other name."""
    digits = folder.name[5:]
    return int(digits) if folder.name.startswith("step-") and digits.isdigit() and digits.isascii() else None


def _regular_file(path: Path, what: str) -> os.stat_result:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise SnapshotInvalid(f"{what} {path.name} is missing") from None
    except OSError as exc:
        raise SnapshotInvalid(f"{what} {path.name} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a symlink"
            if stat.S_ISLNK(info.st_mode)
            else "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "not a regular file"
        )
        raise SnapshotInvalid(f"{what} {path.name} is {kind}; keel writes a regular file there")
    return info


def read_meta(folder: Path) -> dict[str, Any]:
    """``folder``'s ``meta.json``, checked (its own checksum, the tensor file's checksum entry, the step, the
    types); raises `SnapshotInvalid` otherwise. Reads no tensor."""
    info = _regular_file(folder / META, "the metadata file")
    if info.st_size > MAX_META_BYTES:
        raise SnapshotInvalid(f"meta.json is {info.st_size} bytes, more than keel ever writes ({MAX_META_BYTES})")
    try:
        meta = json.loads((folder / META).read_bytes())
    except RecursionError:
        raise SnapshotInvalid("meta.json is nested too deeply to be keel's") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SnapshotInvalid(f"meta.json is not valid JSON ({exc})") from None
    except OSError as exc:
        raise SnapshotInvalid(f"meta.json cannot be read ({exc.strerror or exc})") from None
    if not isinstance(meta, dict):
        raise SnapshotInvalid(f"meta.json holds a JSON {type(meta).__name__}, not an object")
    if "sha256" not in meta:
        raise SnapshotInvalid("meta.json has no checksum of the tensor file")
    if not _is_hex_digest(meta["sha256"]):
        raise SnapshotInvalid("meta.json's checksum of the tensor file is not a SHA-256 hex digest")
    if "meta_sha256" in meta:  # absent in snapshots written before meta.json had its own checksum
        if not _is_hex_digest(meta["meta_sha256"]) or meta["meta_sha256"] != meta_checksum(meta):
            raise SnapshotInvalid("meta.json was changed after it was written: its checksum does not match")
    for key in ("step", "created", "skeleton", "plain"):
        if key not in meta:
            raise SnapshotInvalid(f"meta.json has no '{key}'")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise SnapshotInvalid(f"meta.json's step is {_short(step)}; keel writes an integer from 0 to {MAX_STEP}")
    named = snapshot_step(folder)
    if named is not None and named != step:
        raise SnapshotInvalid(f"meta.json says step {step} but the folder is {folder.name}")
    if isinstance(meta["created"], bool) or not isinstance(meta["created"], (int, float)):
        raise SnapshotInvalid(f"meta.json's created time is {_short(meta['created'])}; keel writes a number")
    if meta.get("run_id") is not None and not isinstance(meta["run_id"], str):
        raise SnapshotInvalid(f"meta.json's run_id is {_short(meta['run_id'])}; keel writes a str")
    return meta


def _read_tensors(path: Path, expected: str) -> dict[str, Tensor]:
    info = _regular_file(path, "the tensor file")
    digest = file_sha256(path)
    if digest != expected:
        declared = _declared_size(path)
        if declared is not None and info.st_size < declared[0]:
            size, whole = declared
            raise SnapshotInvalid(
                f"the tensor file {path.name} is truncated ({info.st_size} of {'' if whole else 'at least '}{size} "
                "bytes): checksum mismatch"
            )
        raise SnapshotInvalid(
            f"the tensor file {path.name} was changed after it was written: checksum mismatch "
            f"({digest[:12]}… instead of {expected[:12]}…)"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type; the checksum matched, so it was written this way
        raise SnapshotInvalid(f"the tensor file {path.name} cannot be read ({type(exc).__name__}: {exc})") from None


def _declared_size(path: Path) -> tuple[int, bool] | None:
    """The size a safetensors file declares in its header (8-byte length, then JSON with the data offsets), and
    True; when the header itself is cut off, the size up to the header's end, and False (the whole file is larger:
    "8 of 216 bytes" named the header's size as the file's). None when it declares nothing usable."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return 8, False
            (length,) = struct.unpack("<Q", head)
            if length > 100 << 20:
                return None
            raw = f.read(length)
            if len(raw) < length:
                return 8 + length, False
            header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + length + max(ends, default=0), True
    except Exception:  # a damaged header: no size to compare with
        return None


def decode(value: Any, tensors: dict[str, Tensor], what: str) -> Any:
    """Tagged JSON → plain data; raises `SnapshotInvalid` on anything `encode` does not write."""
    if isinstance(value, list):
        return [decode(v, tensors, what) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__dtype__") if k in value]
    if len(tags) != 1:
        raise SnapshotInvalid(f"meta.json: {what} hold an object keel does not write ({_short(value)})")
    tag, body = tags[0], value[tags[0]]
    if tag == "__tensor__":
        if not isinstance(body, str) or body not in tensors:
            raise SnapshotInvalid(
                f"meta.json: {what} refer to tensor {_short(body)}, which the tensor file does not hold"
            )
        return tensors[body]
    if tag == "__ndarray__":
        return _array(body, value.get("dtype"), what)
    if tag == "__dtype__":
        return _dtype(body, what)
    if tag == "__tuple__":
        if not isinstance(body, list):
            raise SnapshotInvalid(f"meta.json: {what} hold a tuple that is not a list ({_short(body)})")
        return tuple(decode(v, tensors, what) for v in body)
    if not isinstance(body, list) or not all(
        isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) and not isinstance(kv[0], bool)
        for kv in body
    ):
        raise SnapshotInvalid(
            f"meta.json: {what} hold a dict that is not a list of [key, value] pairs ({_short(body)})"
        )
    return {k: decode(v, tensors, what) for k, v in body}


def _dtype(body: Any, what: str) -> torch.dtype:
    """A torch dtype by its name (``"float32"``), looked up among torch's dtypes only (`_DTYPES`)."""
    dtype = _DTYPES.get(body) if isinstance(body, str) else None
    if dtype is None:
        raise SnapshotInvalid(f"meta.json: {what} hold a dtype {_short(body)} that torch does not have")
    return dtype


def _array(body: Any, dtype: Any, what: str) -> np.ndarray:
    try:
        kind = np.dtype(dtype).kind if isinstance(dtype, str) else None
    except TypeError:
        kind = None
    if kind not in _ARRAY_KINDS:
        raise SnapshotInvalid(f"meta.json: {what} hold an array of dtype {_short(dtype)}; keel writes numeric ones")
    try:
        return np.array(body, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise SnapshotInvalid(f"meta.json: {what} hold an array that is not {dtype} numbers ({exc})") from None


def _check_skeleton(skeleton: Any, tensors: dict[str, Tensor]) -> None:
    bad = "meta.json: the optimizer state is not {param_groups: [...], state: {...}} as keel writes it"
    if (
        not isinstance(skeleton, dict)
        or not isinstance(skeleton.get("param_groups"), list)
        or not isinstance(skeleton.get("state"), dict)
    ):
        raise SnapshotInvalid(bad)
    for group in skeleton["param_groups"]:
        if (
            not isinstance(group, dict)
            or not isinstance(group.get("params"), list)
            or not all(_is_int(i) for i in group["params"])
        ):
            raise SnapshotInvalid(f"{bad}: a parameter group without a list of parameter indices")
    for index, entry in skeleton["state"].items():
        if not _is_int(index) or not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise SnapshotInvalid(f"{bad}: the state of parameter {_short(index)}")
        for value in entry.values():
            if isinstance(value, str) and value.startswith("optim/") and value not in tensors:
                raise SnapshotInvalid(
                    f"meta.json: the optimizer state refers to tensor {_short(value)}, which the "
                    "tensor file does not hold"
                )


def _check_plain(plain: Any) -> None:
    if not isinstance(plain, dict):
        raise SnapshotInvalid("meta.json: the small states are not an object")
    for key, allowed in (
        ("scheduler", (dict, type(None))),
        ("scaler", (dict, type(None))),
        ("components", dict),
        ("tracked", dict),
        ("history", dict),
        ("classes", dict),
        ("rng", dict),
    ):
        if key not in plain and key in ("history", "classes"):
            continue  # written by keel versions before they existed
        if not isinstance(plain.get(key), allowed):
            raise SnapshotInvalid(f"meta.json: the {key} state is {_short(plain.get(key))}, not what keel writes")
    _check_rng(plain["rng"])


def _fixed(value: Any, tensors: dict[str, Tensor]) -> dict[str, FixedTensor]:
    """The fixed parameters a snapshot lists, checked; none when it lists none (written before keel left any out)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or value.get("checksum") != CHECKSUM or not isinstance(value.get("tensors"), list):
        raise SnapshotInvalid(
            f"meta.json: the fixed parameters are {_short(value)}; keel writes "
            f'{{"checksum": "{CHECKSUM}", "tensors": [...]}}'
        )
    fixed: dict[str, FixedTensor] = {}
    for row in value["tensors"]:
        if not (
            isinstance(row, list)
            and len(row) == 4
            and isinstance(row[0], str)
            and row[0].startswith("model/")
            and isinstance(row[1], list)
            and len(row[1]) <= MAX_DIMS
            and all(_is_int(n) and 0 <= n <= MAX_STEP for n in row[1])
            and math.prod(row[1]) <= MAX_STEP
            and isinstance(row[2], str)
            and isinstance(getattr(torch, row[2], None), torch.dtype)
            and isinstance(row[3], str)
            and len(row[3]) == 8
            and set(row[3]) <= _HEX
        ):
            raise SnapshotInvalid(
                f'meta.json: the fixed parameter {_short(row)} is not ["model/<name>", [dims], dtype, '
                "<8 hex digits>] as keel writes it"
            )
        if row[0] in tensors or row[0] in fixed:
            raise SnapshotInvalid(f"meta.json lists {_short(row[0])} as fixed, and stored or listed once already")
        fixed[row[0]] = FixedTensor(shape=tuple(row[1]), dtype=row[2], checksum=row[3])
    return fixed


def _upgrade_history(plain: dict[str, Any]) -> None:
    """Read the history of a snapshot from an earlier keel under today's keys (the post-rollback actions' state
    was ``"remedy"``), so a resume from it keeps its LR back-off."""
    history = plain.get("history")
    if isinstance(history, dict) and LEGACY_HISTORY_KEY in history and HISTORY_KEY not in history:
        history[HISTORY_KEY] = history.pop(LEGACY_HISTORY_KEY)


def _check_rng(rng: dict[str, Any]) -> None:
    """Each RNG state is tried on a throwaway generator, so a bad one is found before any state is touched."""
    for name, load in (
        ("python", random.Random().setstate),
        ("numpy", np.random.RandomState().set_state),
        ("torch", torch.Generator().set_state),
    ):
        if name not in rng:
            raise SnapshotInvalid(f"meta.json: the {name} RNG state is missing")
        try:
            if name == "torch" and not (isinstance(rng[name], Tensor) and rng[name].dtype == torch.uint8):
                raise TypeError("not a uint8 tensor")
            load(rng[name])
        except Exception as exc:
            raise SnapshotInvalid(
                f"meta.json: the {name} RNG state is not valid ({type(exc).__name__}: {str(exc)[:100]})"
            ) from None
    cuda = rng.get("cuda")
    if not isinstance(cuda, list) or not all(isinstance(t, Tensor) and t.dtype == torch.uint8 for t in cuda):
        raise SnapshotInvalid("meta.json: the CUDA RNG states are not a list of uint8 tensors")


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
