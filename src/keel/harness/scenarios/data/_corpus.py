"""A fixed, indexed data set of proxy-corpus windows (example id = index) with some examples poisoned.

The proxy trainer draws random windows afresh each step, which has no example identity; attribution and the skip
list need one, so this takes ``examples`` windows of the proxy corpus's train split once, at random offsets drawn
from a seed, and every run indexes into them. Each epoch visits them in its own seeded random order.

The poison is a window of byte 0x00 (input and target): a zero-filled stretch, as a truncated or preallocated
shard file leaves behind. The corpus (Python source) never holds a NUL byte, so the model learns to rule it out;
every position of the window then asks for that byte at once, and 64 targets pulling the same embedding and
output row make a gradient ~7× a clean batch's per poisoned example in a batch of 16 (measured on the tiny proxy
at steps 40-160; random bytes, or random bytes >= 0x80, only 1.2-1.8×: their per-token pulls point every which
way). Its loss is ~3× a clean example's. keel's loss detector wants twice the median (robust z 12) for
``critical``, its gradient-norm detector 20× (z 12); a batch with four of sixteen windows poisoned reached
1.5-1.7× in loss and 5.8-16.5× in gradient norm (z 8.6-13.8): an ``info`` spike under keel's defaults (see
`keel.harness.bench.data` for the setting that catches it). Fewer per batch stand out more as examples but move
the batch less; more than half would be the batch's median.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from keel.proxy import ProxyBatches

POISON_BYTE = 0  # never in the proxy corpus (Python source text)


class IndexedWindows:
    """``examples`` corpus windows of ``seq_len`` bytes, as (input, next-byte target) rows addressed by id.

    Args:
        examples: How many windows.
        seq_len: Bytes per window.
        seed: Seed of the window offsets and of every epoch's order.
    """

    def __init__(self, *, examples: int, seq_len: int, seed: int) -> None:
        text = ProxyBatches(batch_size=1, seq_len=seq_len, seed=seed).data  # the train split
        starts = torch.randint(len(text) - seq_len - 1, (examples,), generator=torch.Generator().manual_seed(seed))
        windows = torch.stack([text[s : s + seq_len + 1] for s in starts.tolist()])
        self.x, self.y = windows[:, :-1].clone(), windows[:, 1:].clone()
        self.seed = seed

    def __len__(self) -> int:
        return self.x.shape[0]

    def poison(self, ids: Iterable[int]) -> None:
        """Overwrite the windows ``ids`` with the poison (a run of byte 0x00)."""
        for i in ids:
            self.x[i], self.y[i] = POISON_BYTE, POISON_BYTE

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s visiting order: a permutation of every id, the same for every run."""
        generator = torch.Generator().manual_seed(1000 * self.seed + epoch + 1)
        return torch.randperm(len(self), generator=generator).tolist()

    def batch(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.tensor(ids)
        return self.x[index], self.y[index]


def batched(indices: Iterable[int], size: int) -> Iterator[list[int]]:
    """Consecutive full batches of ``size`` ids (a short last one is dropped, as ``drop_last=True``)."""
    batch: list[int] = []
    for i in indices:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
