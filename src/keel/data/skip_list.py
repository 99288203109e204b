"""The skip list: the example ids a run must not train on again, with the step and the reason for each entry.

`keel.Guard` writes it as ``run_dir/skip_list.json`` when a rollback steps past a window of batches (the window's
ids) and when it attributes a spike to examples (the attributed ids); `keel.data.SkipListSampler` reads it, so a
resumed run — or the next epoch of this one — never sees those examples again. The file is JSON a user may read,
edit or write by hand (OLMo-core's ``steps_to_skip`` and Megatron's ``iterations_to_skip`` name steps; this names
examples, which survive a change of batch size or data order)::

    {"keel_skip_list": 1, "entries": [
      {"kind": "window", "first_step": 120, "last_step": 131, "ids": "3840-4223", "reason": "rollback at 131: ..."},
      {"kind": "examples", "first_step": 131, "last_step": 131, "ids": "4107,4111", "reason": "loss_spike: ..."}]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from keel._core.example_ids import MAX_IDS, as_id_list, count_ids, format_ids, parse_ids
from keel._core.files import write_whole

SKIP_LIST_NAME = "skip_list.json"
FORMAT_VERSION = 1
EntryKind = Literal["window", "examples"]
ENTRY_KINDS: tuple[str, ...] = get_args(EntryKind)
MAX_FILE_BYTES = 64 * 2**20  # a skip list is ids as ranges: anything larger is not one
# the ids of all its entries (each entry's distinct ids, summed: what reading the file makes), so that a few bytes
# of ranges ("0-9999999", "10000000-19999999", ...) cannot cost gigabytes; MAX_IDS already bounds each entry
MAX_TOTAL_IDS = MAX_IDS


@dataclass(frozen=True, kw_only=True)
class SkipEntry:
    """One reason to skip examples.

    Attributes:
        kind: ``"window"`` — every example of the batches a rollback stepped past; ``"examples"`` — the examples a
            spike was attributed to.
        first_step: The first step the entry covers.
        last_step: The last step it covers (``first_step`` for one step).
        ids: The example ids (kept ascending and distinct, as the file holds them).
        reason: Why, in words.
    """

    kind: EntryKind
    first_step: int
    last_step: int
    ids: tuple[int, ...]
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ENTRY_KINDS:
            raise ValueError(f"SkipEntry.kind={self.kind!r}; allowed: {', '.join(ENTRY_KINDS)}")
        for name in ("first_step", "last_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SkipEntry.{name}={value!r}; allowed: an int >= 0")
        if self.last_step < self.first_step:
            raise ValueError(
                f"SkipEntry.last_step={self.last_step} is before first_step={self.first_step}; allowed: last >= first"
            )
        if not isinstance(self.reason, str):
            raise ValueError(f"SkipEntry.reason={self.reason!r:.60}; allowed: text")
        # checked here, not when written: an id like -1 would make the whole file unreadable for every later run
        object.__setattr__(self, "ids", tuple(sorted(set(as_id_list(self.ids, "SkipEntry.ids")))))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "ids": format_ids(self.ids),
            "reason": self.reason,
        }


class SkipList:
    """The entries of one skip-list file, read at construction and appended to by `add` (written at once).

    Args:
        path: The file (a path ending in ``.json``, or an existing file), or the run directory holding
            ``skip_list.json`` (which need not exist yet). A file that does not exist yet is an empty list.

    Raises:
        ValueError: The file is not a keel skip list (not JSON, another format version, an entry that does not
            fit `SkipEntry`); the message names the file and the problem, and the file is left as it is.

    Example:
        >>> import tempfile
        >>> skips = SkipList(tempfile.mkdtemp())
        >>> skips.add(SkipEntry(kind="examples", first_step=7, last_step=7, ids=(3, 9), reason="loss_spike"))
        >>> sorted(SkipList(skips.path).ids())
        [3, 9]
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        # by suffix, not "has a dot": run directories are often named like "lr3e-4.bs32"
        self.path = path if path.suffix == ".json" or path.is_file() else path / SKIP_LIST_NAME
        self.entries: list[SkipEntry] = read_entries(self.path) if self.path.exists() else []

    def ids(self, kinds: Iterable[str] = ENTRY_KINDS) -> frozenset[int]:
        """Every id of the entries of ``kinds``."""
        wanted = set(kinds)
        return frozenset(i for e in self.entries if e.kind in wanted for i in e.ids)

    def add(self, entry: SkipEntry) -> None:
        """Append ``entry`` to the file as it is now and write it (to a temporary name, then renamed: a reader never
        sees half, and a failed write leaves the file and `entries` as they were).

        The file is read again first, so entries another writer (a hand edit, another process) added since this
        list was read are kept; an entry equal to one the file holds already is not written twice (a run killed
        after its rollback was written here, but before a snapshot after it was on disk, does that rollback again
        when resumed: each such kill added the same window once more).

        Raises:
            ValueError: The file is there but is not a keel skip list, or the entry would take its ids past
                `MAX_TOTAL_IDS` in all (the file is left as it is).
            OSError: The file could not be written.
        """
        held = read_entries(self.path) if self.path.exists() else []
        if entry in held:
            self.entries = held
            return
        entries = [*held, entry]
        total = sum(len(e.ids) for e in entries)
        if total > MAX_TOTAL_IDS:
            raise ValueError(_too_many(self.path, len(entries) - 1, total, "would name"))
        payload = {"keel_skip_list": FORMAT_VERSION, "entries": [e.to_json() for e in entries]}
        write_whole(self.path, json.dumps(payload, indent=1))
        self.entries = entries


def read_entries(path: Path) -> list[SkipEntry]:
    """The entries of the skip-list file at ``path``; one ValueError naming the file when it is not one."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a keel skip list (allowed: up to {MAX_FILE_BYTES} bytes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested 100k deep, a 5000-digit number
        raise ValueError(f"{path}: not a keel skip list (not JSON: {str(exc)[:120]})") from None
    version = data.get("keel_skip_list") if isinstance(data, dict) else None
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0: both == 1
        found = version if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path}: not a keel skip list of format {FORMAT_VERSION} (its 'keel_skip_list' is {found!r:.40}); "
            f'allowed: {{"keel_skip_list": {FORMAT_VERSION}, "entries": [...]}}'
        )
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'entries' is {type(entries).__name__}; allowed: a list of entries")
    _check_total(path, entries)
    return [_entry(path, n, raw) for n, raw in enumerate(entries)]


def _check_total(path: Path, entries: list[object]) -> None:
    """Count the entries' ids before any is made (an entry whose ids are not ids text counts none here:
    `_entry` names what is wrong with it)."""
    total = 0
    for n, raw in enumerate(entries):
        try:
            total += count_ids(raw["ids"]) if isinstance(raw, dict) and "ids" in raw else 0
        except ValueError:
            continue
        if total > MAX_TOTAL_IDS:
            raise ValueError(_too_many(path, n, total, "name"))


def _too_many(path: Path, last: int, total: int, verb: str) -> str:
    return f"{path}: entries 0-{last} {verb} {total} ids in all; allowed: at most {MAX_TOTAL_IDS} in one skip list"


def _entry(path: Path, n: int, raw: object) -> SkipEntry:
    fields = ("kind", "first_step", "last_step", "ids", "reason")
    if not isinstance(raw, dict) or not set(fields[:4]) <= raw.keys():
        raise ValueError(f"{path}: entry {n} is {raw!r:.80}; allowed: an object with {', '.join(fields)}")
    try:
        return SkipEntry(
            kind=cast(EntryKind, raw["kind"]),
            first_step=raw["first_step"],
            last_step=raw["last_step"],
            ids=tuple(parse_ids(raw["ids"])),
            reason=raw.get("reason", ""),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: entry {n}: {exc}") from None
