"""keel's DDP communication hook averages gradients bit-for-bit as DDP's own reducer does, at 3 ranks too (x / 3
rounds unlike x * (1/3): with DDP's python ``allreduce_hook`` a 3-rank run drifted ~1e-8 from plain DDP, and a
resumed run from the uninterrupted one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # three ranks on two cores

WORKER = Path(__file__).with_name("hook_exact_worker.py")


def test_keels_hook_averages_three_ranks_gradients_bit_for_bit_as_ddp_does(tmp_path):
    torchrun(WORKER, str(tmp_path), nproc=3)
    for rank in range(3):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["equal"] == [True] * 4
