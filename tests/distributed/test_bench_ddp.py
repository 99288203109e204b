"""`keel bench overhead --ddp N` runs end to end (tiny settings: the figures themselves live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os

import pytest

from keel.cli import main as keel_main
from keel.harness.bench.ddp import DDPOverheadConfig
from tests.distributed.launch import ROOT


@pytest.mark.slow  # a benchmark run end to end
@pytest.mark.distributed
def test_bench_overhead_ddp_reports_ratios_from_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    assert (
        keel_main(
            [
                "bench",
                "overhead",
                "--ddp",
                "2",
                "--size",
                "tiny",
                "--steps",
                "2",
                "--repeats",
                "2",
                "--batch-size",
                "4",
                "--seq-len",
                "16",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["world_size"] == 2 and result["config"]["backend"] == "gloo"
    assert set(result["step_ms"]) == {"bare", "default", "no_rank_stats"}
    assert all(v > 0 for v in result["step_ms"].values())
    assert result["ratio_default"] > 0 and result["ratio_no_rank_stats"] > 0


def test_ddp_config_names_field_value_and_allowed():
    with pytest.raises(ValueError, match=r"DDPOverheadConfig.nproc=1; allowed: an int >= 2"):
        DDPOverheadConfig(nproc=1)
    with pytest.raises(ValueError, match=r"DDPOverheadConfig.backend='mpi'; allowed: gloo, nccl"):
        DDPOverheadConfig(backend="mpi")
