"""Fixed parameters: the ones training cannot change, which snapshots leave out, and the checks that make that safe.

**The rule.** A snapshot copies the parameters the optimizer can change — those in one of its ``param_groups`` that
require a gradient (or hold one) when the snapshot is taken — plus every buffer and all optimizer state. Every other
parameter is *fixed*: the snapshot records its layout and a cheap proof of identity instead of a copy. For a LoRA
fine-tune the frozen base is over 99 % of the bytes, so a snapshot shrinks to the adapters and their moments. A
frozen parameter passed to the optimizer anyway (``AdamW(model.parameters())`` on a peft model) has no gradient and
no state, and is fixed too. ``RecoveryConfig(copy_fixed=True)`` copies every parameter, as keel did before.

**A rollback never restores silently wrong state.** Before restoring a snapshot, `stale_reason` asks of each
parameter it left out whether it may have changed since: it is trainable now (progressive unfreezing: its first
update follows), a later snapshot found it trained (unfrozen and frozen again in between), its version counter moved
(an in-place write: ``p.mul_()``, ``load_state_dict``, a non-fused optimizer step) or its storage was replaced
(``p.data = …``). Such a snapshot is refused with the reason, and the rollback falls back to an older snapshot
that is usable, or aborts saying why. Keeping a copy of a fixed parameter at the moment it becomes trainable was
the alternative; it needs a check before every ``optimizer.step()`` on the hot path and a surprise copy of the layer
just unfrozen, where a refusal costs nothing until a rollback and loses only the snapshots from before the
unfreezing (the ring refills within ``snapshot_every`` steps).

**What is not seen.** A write through ``p.data`` (``p.data.add_(…)``, which peft's ``merge_adapter`` uses) and a
fused optimizer step (``AdamW(fused=True)`` does not move the version counter) change values without a trace; the
second only matters for a parameter that was trainable for a while and is frozen again by the rollback. Code that
writes frozen weights that way during training should set ``copy_fixed=True``.

**Disk snapshots** leave the fixed parameters out too: the script that resumes rebuilds the base from its
pretrained weights. Each disk snapshot stores their names, shapes, dtypes and a CRC-32 of each one's bytes,
computed once per parameter (again only when its version counter or storage moved), in the writer's background
thread: one pass over the base at zlib's CRC-32 speed (measured 2.1 GB/s on one core, 0.5-0.7 GB/s on a loaded
2-core machine: about the cost of one copy of the base), once per run.
A resume computes the same checksums of the live parameters and refuses, naming the first tensor that differs,
a base other than the one the run was trained on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

CHECKSUM = "crc32"  # the algorithm named in meta.json, so a later keel can tell its checksums from another's
CHUNK_BYTES = 64 << 20  # a device tensor is checksummed through host copies of this size


@dataclass(frozen=True, kw_only=True)
class FixedTensor:
    """A parameter a snapshot left out.

    Attributes:
        shape: Its shape.
        dtype: Its dtype without the ``torch.`` prefix (``"bfloat16"``).
        version: Its version counter when the snapshot was taken; None in a snapshot read from disk.
        storage: Its data pointer then; None in a snapshot read from disk.
        checksum: CRC-32 of its bytes as 8 hex digits, once computed (disk snapshots); None until then.
        tensor: The live parameter itself (not a copy), for the disk writer's checksum; None from disk.
    """

    shape: tuple[int, ...]
    dtype: str
    version: int | None = None
    storage: int | None = None
    checksum: str | None = None
    tensor: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, t: Tensor) -> FixedTensor:
        return cls(shape=tuple(t.shape), dtype=dtype_name(t.dtype), version=t._version, storage=t.data_ptr(), tensor=t)

    def moved(self, t: Tensor) -> bool:
        """Whether ``t`` was written in place or given new storage since this record was made."""
        return t._version != self.version or t.data_ptr() != self.storage


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def trained_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """Ids of the parameters ``optimizer.step()`` can change now: in a param group, and requiring or holding a
    gradient (torch's optimizers update every parameter whose ``.grad`` is set)."""
    return {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad or p.grad is not None}


def checksum(t: Tensor) -> str:
    """CRC-32 of ``t``'s bytes in memory order, as 8 hex digits; a device tensor is read through host chunks."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    crc = 0
    for start in range(0, flat.numel(), CHUNK_BYTES):
        chunk = flat[start : start + CHUNK_BYTES].cpu()
        crc = zlib.crc32(chunk.numpy().data, crc)  # releases the GIL on large buffers
    return f"{crc:08x}"


def stale_reason(
    fixed: dict[str, FixedTensor],
    live: dict[str, Tensor],
    trained_now: set[str],
    last_trained: dict[str, int],
    step: int,
) -> str | None:
    """Why a snapshot of ``step`` that left out ``fixed`` cannot restore the live state; None when it can.

    Args:
        fixed: The snapshot's fixed parameters by key (``model/<name>``).
        live: The live tensors by the same keys.
        trained_now: Keys of the parameters the optimizer can change now.
        last_trained: For each key, the newest step at which a snapshot found it trained.
    """
    for key, record in fixed.items():
        name = key.removeprefix("model/")
        t = live.get(key)
        if t is None:
            return f"{name} is no longer a parameter of the model"
        if key in trained_now:
            return f"it left out {name}, frozen then and trainable now"
        if last_trained.get(key, -1) > step:
            return f"it left out {name}, frozen then and trained at step {last_trained[key]}"
        if record.version is not None and record.moved(t):
            return (
                f"it left out {name}, outside the optimizer's groups (frozen, or trained by another optimizer: "
                "give keel every optimizer, keel.Optimizers), which was written in place since"
            )
    return None


def fixed_differences(fixed: dict[str, FixedTensor], live: dict[str, Tensor]) -> list[str]:
    """The first fixed parameter whose live values differ from the checksum a disk snapshot recorded, in words
    (empty when all match). Layouts are compared elsewhere (`keel.recover.compat`); a missing one is skipped."""
    for key, record in fixed.items():
        t = live.get(key)
        if record.checksum is None or t is None or tuple(t.shape) != record.shape:
            continue
        now = checksum(t)
        if now != record.checksum:
            return [
                f"model {key.removeprefix('model/')}: a fixed (untrained) parameter, left out of the snapshot, "
                f"holds other values than in the run that wrote it ({CHECKSUM} {record.checksum} in the snapshot, "
                f"{now} now): load the same base weights it was trained from"
            ]
    return []


def placeholders(fixed: dict[str, FixedTensor]) -> dict[str, Tensor]:
    """Meta tensors with the layout of each fixed parameter, so layout checks treat them like stored ones."""
    return {k: torch.empty(r.shape, dtype=getattr(torch, r.dtype), device="meta") for k, r in fixed.items()}
