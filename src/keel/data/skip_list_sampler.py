"""SkipListSampler: any index sampler, less the examples a keel skip list names.

Wrap the sampler a ``DataLoader`` uses (``RandomSampler``, ``SequentialSampler``, ``DistributedSampler``, a
stateful one) or its batch sampler (a ``BatchSampler``, a bucketing or length-grouped one: each batch keeps its ids
that are not skipped, and a batch left empty is left out); pass ``run_dir`` (or the ``skip_list.json`` in it). The
list is read again whenever the file changes — checked at the start of each epoch and every ``check_every``
indices — so examples a rollback or an attribution adds during training are left out from then on, and a resumed
run never sees them.

Example:
    >>> import tempfile
    >>> from keel.data.skip_list import SkipEntry, SkipList
    >>> run_dir = tempfile.mkdtemp()
    >>> SkipList(run_dir).add(SkipEntry(kind="examples", first_step=4, last_step=4, ids=(1, 3)))
    >>> list(SkipListSampler(range(6), run_dir))
    [0, 2, 4, 5]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

from torch.utils.data import BatchSampler

from keel._core.errors import KeelWarning
from keel.data.skip_list import ENTRY_KINDS, SkipList


class SkipListSampler:
    """Yield the indices of ``sampler`` that the skip list does not name.

    Args:
        sampler: Any iterable of example indices (a ``torch.utils.data.Sampler``, a range).
        skip_list: A run directory, a skip-list file, or a `SkipList`.
        kinds: The entry kinds honoured (one name or several): ``"window"`` (every example of the batches a
            rollback stepped past, as PaLM skipped whole windows) and ``"examples"`` (those a spike was attributed
            to). Both by default.
        check_every: Indices between checks of the file for changes (a ``stat``, microseconds).

    Raises:
        ValueError: ``kinds`` names an unknown kind, ``check_every`` is not a positive int, or the file is there
            but is not a keel skip list. A file that turns bad later (a hand edit half saved) is not an error:
            a `KeelWarning` names it and the last list read stays in force, so training goes on.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        skip_list: str | Path | SkipList,
        *,
        kinds: Iterable[str] = ENTRY_KINDS,
        check_every: int = 256,
    ) -> None:
        self.kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)  # "window", not 'w', 'i', 'n', ...
        unknown = [k for k in self.kinds if k not in ENTRY_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"SkipListSampler kinds={self.kinds!r}; allowed: one or more of {', '.join(ENTRY_KINDS)}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"SkipListSampler check_every={check_every!r}; allowed: an int >= 1")
        self.sampler = sampler
        self.check_every = check_every
        self.path = skip_list.path if isinstance(skip_list, SkipList) else SkipList(skip_list).path
        # (inode, mtime_ns, size) of the file last read: SkipList.add writes a new file (a new inode) each time,
        # so a rewrite of the same size within a coarse mtime tick is still seen
        self._seen: tuple[int, int, int] | None = None
        self.skipped: frozenset[int] = frozenset()
        self._refresh(strict=True)

    def _refresh(self, *, strict: bool = False) -> None:
        """Read the list again if the file changed since it was last read (a missing file is an empty list).

        A file that is not a skip list raises when ``strict`` (at construction); later it warns once per version
        of the file and the last list read stays in force (a sampler must not stop training mid-epoch).
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self.skipped = None, frozenset()
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self.skipped = SkipList(self.path).ids(self.kinds)
        except (ValueError, OSError) as exc:
            if strict:
                raise
            warnings.warn(f"{exc}; skipping the {len(self.skipped)} ids read before", KeelWarning, stacklevel=3)

    def __iter__(self) -> Iterator[Any]:
        self._refresh()
        for n, item in enumerate(self.sampler, 1):
            if n % self.check_every == 0:
                self._refresh()
            if isinstance(item, (list, tuple)):  # a batch sampler's batch (bucketing, length-grouped): its ids filtered
                kept = [i for i in item if i not in self.skipped]
                if kept:  # a batch the skip list emptied is left out
                    yield kept
            elif item not in self.skipped:
                yield item

    def __len__(self) -> int:
        """The wrapped sampler's length less the skipped ids below it: exact for samplers that yield each index
        of ``range(len(sampler))`` once (sequential, random without replacement); only an estimate for one that
        yields a share or a subset of the dataset's ids (a ``DistributedSampler``'s rank, a
        ``SubsetRandomSampler``), which cannot be counted without drawing its order."""
        if not isinstance(self.sampler, Sized):
            raise TypeError(f"{type(self.sampler).__name__} has no len(); neither has the SkipListSampler over it")
        if isinstance(self.sampler, BatchSampler):  # batches: their count, at most (one emptied is left out)
            return len(self.sampler)
        self._refresh()
        total = len(self.sampler)
        return total - sum(1 for i in self.skipped if i < total)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped sampler (``DistributedSampler`` reshuffles by epoch)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped sampler's state (a stateful sampler's position), for ``Guard.track``."""
        state_dict = getattr(self.sampler, "state_dict", None)
        return state_dict() if callable(state_dict) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_state_dict = getattr(self.sampler, "load_state_dict", None)
        if callable(load_state_dict):
            load_state_dict(state)
