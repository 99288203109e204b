"""The proxy corpus: the Python standard library's own source text, read as bytes.

Every Python installation carries it, so proxy runs need no download. Byte-level tokens (vocabulary 256)
keep the model family free of a tokenizer.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_MAX_BYTES = 4_000_000


@functools.lru_cache(maxsize=4)
def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """The first ``max_bytes`` of the standard library's ``*.py`` files, in sorted path order, as uint8.

    Sorted order makes the corpus identical for every run on the same Python version.
    """
    if max_bytes < 1024:
        raise ValueError(f"max_bytes={max_bytes}; allowed: at least 1024")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 1024:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


class ProxyBatches:
    """Random windows of the corpus as (inputs, next-byte targets), reproducible from a seed.

    Example:
        >>> batches = ProxyBatches(batch_size=2, seq_len=8, seed=0)
        >>> x, y = batches.next()
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([2, 8]), True)
    """

    def __init__(
        self,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        split: str = "train",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; allowed: train, val")
        data = load_corpus(max_bytes)
        # Every 10th block of 64 KiB is held out, so both splits sample the whole library alike.
        blocks = np.arange(len(data)) // 65536
        keep = (blocks % 10 == 9) if split == "val" else (blocks % 10 != 9)
        self.data = torch.from_numpy(data[keep].astype(np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # batches drawn so far: the data position a snapshot records

    def state_dict(self) -> dict[str, object]:
        """The data position: batches drawn and the sampler's RNG state (for `Guard.track`)."""
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        position = state["position"]
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"ProxyBatches state position={position!r}; allowed: an int >= 0")
        self.position = position
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]

    def next(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        window = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()])
        self.position += 1
        return window[:, :-1], window[:, 1:]
