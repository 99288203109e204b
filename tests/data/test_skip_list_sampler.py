"""SkipListSampler: any index sampler less the examples a skip list names, re-reading the file as it changes."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from keel._core.errors import KeelWarning
from keel.data import SkipEntry, SkipList, SkipListSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def add(run_dir: Path, kind: str, ids: tuple[int, ...], step: int = 5) -> None:
    SkipList(run_dir).add(SkipEntry(kind=kind, first_step=step, last_step=step, ids=ids, reason="test"))  # type: ignore[arg-type]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    add(tmp_path, "window", (1, 2))
    add(tmp_path, "examples", (7,))
    return tmp_path


def test_both_kinds_are_skipped_by_default(run_dir: Path) -> None:
    assert list(SkipListSampler(range(10), run_dir)) == [0, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize(("kinds", "left_out"), [(["window"], {1, 2}), (("examples",), {7}), ("examples", {7})])
def test_only_the_named_kinds_are_skipped(run_dir: Path, kinds, left_out: set[int]) -> None:
    assert list(SkipListSampler(range(10), run_dir, kinds=kinds)) == [i for i in range(10) if i not in left_out]


def test_a_missing_file_skips_nothing_and_is_picked_up_once_written(tmp_path: Path) -> None:
    sampler = SkipListSampler(range(5), tmp_path)
    assert list(sampler) == [0, 1, 2, 3, 4]
    add(tmp_path, "examples", (3,))
    assert list(sampler) == [0, 1, 2, 4]


def test_the_skip_list_file_path_and_a_skip_list_object_work_like_the_run_dir(run_dir: Path) -> None:
    expected = list(SkipListSampler(range(10), run_dir))
    assert list(SkipListSampler(range(10), run_dir / "skip_list.json")) == expected
    assert list(SkipListSampler(range(10), SkipList(run_dir))) == expected


def test_an_entry_added_mid_iteration_is_honoured_after_check_every_indices(tmp_path: Path) -> None:
    sampler = SkipListSampler(range(20), tmp_path, check_every=4)
    out = []
    for index in sampler:
        out.append(index)
        if index == 1:  # the guard attributes a spike to 2, 3, 9 and 10
            add(tmp_path, "examples", (2, 3, 9, 10))
    # the file is checked before the 4th, 8th, ... index: 2 (the 3rd) was decided against the old list
    assert out == [0, 1, 2, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def test_a_rewrite_of_the_same_size_within_the_same_mtime_is_still_seen(tmp_path: Path) -> None:
    add(tmp_path, "examples", (1,))
    path = tmp_path / "skip_list.json"
    sampler = SkipListSampler(range(4), tmp_path)
    assert list(sampler) == [0, 2, 3]
    before = path.stat()
    data = json.loads(path.read_text())
    data["entries"][0]["ids"] = "2"  # same size
    tmp = tmp_path / "new.json"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # as SkipList.add writes: a new file under the old name
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # a coarse-mtime file system
    assert path.stat().st_size == before.st_size
    assert list(sampler) == [0, 1, 3]


def test_a_file_that_turns_hostile_mid_run_warns_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    add(tmp_path, "examples", (1,))
    sampler = SkipListSampler(range(6), tmp_path, check_every=2)
    out = []
    with pytest.warns(KeelWarning, match="skip_list.json"):
        for index in sampler:
            out.append(index)
            if index == 0:
                (tmp_path / "skip_list.json").write_text("{half a fi")
    assert out == [0, 2, 3, 4, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per bad version of the file, not one per check
        assert list(sampler) == [0, 2, 3, 4, 5]
    add_path = tmp_path / "skip_list.json"
    add_path.unlink()
    add(tmp_path, "examples", (4,))
    assert list(sampler) == [0, 1, 2, 3, 5]


def test_a_hostile_file_at_construction_is_one_value_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "skip_list.json").write_text("[]")
    with pytest.raises(ValueError, match="skip_list.json"):
        SkipListSampler(range(3), tmp_path)


def test_len_is_the_wrapped_length_less_the_skipped_ids_below_it(run_dir: Path) -> None:
    add(run_dir, "examples", (50,))  # past the end: not counted
    sampler = SkipListSampler(SequentialSampler(range(10)), run_dir)
    assert len(sampler) == 7 == len(list(sampler))
    assert len(SkipListSampler(range(10), run_dir, kinds=["window"])) == 8


def test_len_of_an_unsized_sampler_is_a_type_error(run_dir: Path) -> None:
    with pytest.raises(TypeError, match="no len"):
        len(SkipListSampler(iter(range(3)), run_dir))


class StatefulSampler:
    def __init__(self) -> None:
        self.epoch, self.loaded = None, None

    def __iter__(self):
        return iter(range(4))

    def __len__(self) -> int:
        return 4

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"position": 3}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def test_set_epoch_and_state_dict_pass_through_to_the_wrapped_sampler(run_dir: Path) -> None:
    inner = StatefulSampler()
    sampler = SkipListSampler(inner, run_dir)
    sampler.set_epoch(3)
    assert inner.epoch == 3
    assert sampler.state_dict() == {"position": 3}
    sampler.load_state_dict({"position": 1})
    assert inner.loaded == {"position": 1}


def test_a_sampler_without_state_passes_through_as_nothing(run_dir: Path) -> None:
    sampler = SkipListSampler(range(3), run_dir)
    sampler.set_epoch(1)
    sampler.load_state_dict({})
    assert sampler.state_dict() == {}


def test_inside_a_dataloader_with_a_random_sampler_the_skipped_examples_never_appear(run_dir: Path) -> None:
    data = TensorDataset(torch.arange(40))
    generator = torch.Generator().manual_seed(0)
    sampler = SkipListSampler(RandomSampler(data, generator=generator), run_dir)
    loader = DataLoader(data, batch_size=8, sampler=sampler, num_workers=0)
    for _epoch in range(2):
        seen = torch.cat([batch for (batch,) in loader]).tolist()
        assert sorted(seen) == [i for i in range(40) if i not in {1, 2, 7}]
    assert len(loader) == 5  # 37 examples in batches of 8


def test_the_random_order_of_the_kept_examples_is_the_wrapped_samplers_own(run_dir: Path) -> None:
    bare = list(RandomSampler(range(40), generator=torch.Generator().manual_seed(3)))
    wrapped = list(SkipListSampler(RandomSampler(range(40), generator=torch.Generator().manual_seed(3)), run_dir))
    assert wrapped == [i for i in bare if i not in {1, 2, 7}]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"kinds": ["window", "batch"]}, "kinds"),
        ({"kinds": []}, "kinds"),
        ({"kinds": "windows"}, "kinds"),
        ({"check_every": 0}, "check_every"),
        ({"check_every": 1.5}, "check_every"),
        ({"check_every": True}, "check_every"),
    ],
)
def test_bad_kinds_and_check_every_are_refused_naming_them(tmp_path: Path, kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"{named}=.*allowed"):
        SkipListSampler(range(3), tmp_path, **kwargs)


def test_a_batch_sampler_keeps_each_batchs_ids_that_are_not_skipped(tmp_path):
    # passed as DataLoader(batch_sampler=...), as bucketing samplers are: "unhashable type: 'list'" mid-iteration
    # before (reviewer V23)
    from torch.utils.data import BatchSampler, SequentialSampler

    SkipList(tmp_path).add(SkipEntry(kind="examples", first_step=1, last_step=1, ids=(3, 4, 5, 6, 7)))
    sampler = SkipListSampler(BatchSampler(SequentialSampler(range(10)), 4, drop_last=False), tmp_path)
    assert list(sampler) == [[0, 1, 2], [8, 9]]  # the batch 4-7 was emptied: left out
    assert len(sampler) == 3  # the wrapped sampler's batches, at most
