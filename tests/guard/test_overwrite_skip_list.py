"""overwrite=True deletes the earlier run's skip list with its other files (reviewer V16 of session 13: a new run's
SkipListSampler kept passing over the old run's examples, and its entries were appended to the old ones)."""

from __future__ import annotations

import pytest
import torch

from keel import Guard
from keel.data import SkipEntry, SkipList
from tests.conftest import TinyNet


def test_overwrite_starts_the_new_run_with_no_skip_list(tmp_path):
    model = TinyNet()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(tmp_path))
    loss = model(torch.randn(2, 8)).pow(2).mean()
    loss.backward()
    guard.step(loss)
    guard.close()
    SkipList(tmp_path).add(SkipEntry(kind="examples", first_step=30, last_step=30, ids=[100], reason="a spike"))
    assert (tmp_path / "skip_list.json").exists()
    with pytest.raises(ValueError, match="skip_list.json"):  # named among what overwrite deletes
        Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(tmp_path)).close()
    Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(tmp_path), overwrite=True).close()
    assert not (tmp_path / "skip_list.json").exists()
