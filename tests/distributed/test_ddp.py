"""DDP under real torchrun processes (gloo, CPU): every rank decides on all-reduced values and acts together.

Each test starts ``torchrun`` on tests/distributed/ddp_worker.py, which injects one fault on one rank and
writes each rank's actions, parameters and findings as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from keel.store import RunReader
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_scenario(tmp_path: Path, scenario: str, nproc: int = 2) -> list[dict]:
    torchrun(WORKER, scenario, str(tmp_path), nproc=nproc)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def _named(result: dict, rule: str | None = None) -> list[tuple[int, int, str]]:
    return [
        (f["step"], f["evidence"]["rank"], f["evidence"].get("feature", ""))
        for f in result["findings"]
        if f["kind"] == "rank_outlier" and (rule is None or f["evidence"]["rule"] == rule)
    ]


def test_nan_gradient_on_one_rank_makes_every_rank_skip(tmp_path):
    ranks = run_scenario(tmp_path, "nan_grad")
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert [i for i, a in enumerate(ranks[0]["actions"]) if a != "ok"] == [12]
    assert ranks[0]["actions"][12] == "skip"
    assert ranks[0]["params"] == ranks[1]["params"]  # bit-identical replicas after the fault
    assert all(math.isfinite(v) for p in ranks[1]["params"] for v in p)
    assert ranks[0]["opt_steps"] == ranks[1]["opt_steps"] == [39] * 4  # the skipped update left no trace
    assert ranks[0]["last_lr"] == ranks[1]["last_lr"]
    for r in ranks:  # the detector names the rank the NaN came from, on every rank
        assert _named(r, "non_finite") == [(12, 1, "")]
    with RunReader(tmp_path / "run") as store:  # rank 0 wrote the one store
        assert [(d.step, d.action) for d in store.decisions()] == [(12, "skip")]
        assert store.meta()["distributed"]["world_size"] == 2
        assert [f.evidence["rank"] for f in store.findings() if f.kind == "rank_outlier"] == [1]
        steps, values = store.signal("rank/grad/norm/1")  # per-rank values are stored on non-finite steps
        assert 12 in steps.tolist() and math.isnan(values[steps.tolist().index(12)])
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.sqlite")] == ["run/run.sqlite"]


def test_rollback_restores_every_rank_to_the_same_snapshot(tmp_path):
    ranks = run_scenario(tmp_path, "nan_param")
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert ranks[0]["actions"][23] == "rollback"  # at once on every rank: the parameters are read on the bad step
    assert all(a == "ok" for a in ranks[0]["actions"][24:])
    assert ranks[0]["restored"] == ranks[1]["restored"] and len(ranks[0]["restored"]) == 1
    assert ranks[0]["restored"][0] < 23
    assert ranks[0]["params"] == ranks[1]["params"]
    assert all(math.isfinite(v) for p in ranks[1]["params"] for v in p)
    assert ranks[0]["last_lr"] == ranks[1]["last_lr"]
    for rank in (0, 1):  # each rank keeps its own disk snapshots; rank 0's are in the store
        assert any((tmp_path / "run" / f"rank-{rank}" / "snapshots").glob("step-*"))
    with RunReader(tmp_path / "run") as store:
        [rollback] = [d for d in store.decisions() if d.action == "rollback"]
        assert rollback.restored_step == ranks[0]["restored"][0]
        assert all("rank-0" in s["path"] for s in store.snapshots())


@pytest.mark.slow  # `make test-all`; the skip and rollback tests above keep DDP in the default suite
def test_observe_under_ddp_is_bit_identical_to_bare_ddp_and_silent_when_healthy(tmp_path):
    ranks = run_scenario(tmp_path, "observe")
    for r in ranks:
        assert r["params"] == r["bare_params"]  # the communication hook leaves gradients as DDP's own
        # One device→host copy per step, the collective included (AdamW reads its own step counts either way).
        # Steps 0 and 1 (two layouts: the parameter-norm probe's cadence step, then the others) also read the two
        # CPU integers by which the ranks check that they packed the same layout; later steps' layouts are agreed.
        extra = [k - b for k, b in zip(r["host_reads"], r["bare_host_reads"], strict=True)]
        assert extra == [2, 2] + [1] * 198
        assert r["findings"] == []  # 200 healthy steps: no false alarm of any kind
    with RunReader(tmp_path / "run") as store:
        local = [store.signal(f"rank/grad/local_norm/{r}")[1] for r in (0, 1)]
        assert len(local[0]) > 0 and (local[0] != local[1]).any()  # each rank's own gradient, before averaging
        _, cos = store.signal("rank/grad/cos/0")
        assert ((cos > -1) & (cos < 1)).all()


@pytest.mark.slow  # `make test-all`; tests/distributed/test_rank_outlier.py covers the naming in-process
def test_a_shard_that_goes_bad_is_named_within_five_steps(tmp_path):
    ranks = run_scenario(tmp_path, "bad_shard")  # rank 1's targets go bad at step 40
    for r in ranks:
        named = _named(r, "onset")
        assert named[0] == (44, 1, "loss")  # the recent median turns on the 5th bad step; nothing before
        assert {rank for _, rank, _ in _named(r)} == {1}
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.slow  # three ranks on two cores: `make test-all`
def test_a_shard_bad_from_the_start_is_named_among_three_ranks(tmp_path):
    ranks = run_scenario(tmp_path, "bad_shard_from_start", nproc=3)
    for r in ranks:
        named = _named(r, "persistent")
        assert {rank for _, rank, _ in _named(r)} == {2}
        assert (20, 2, "loss") in named  # as soon as the warm-up ends
        assert {feature for _, _, feature in named} == {"loss", "grad_norm", "disagreement"}


@pytest.mark.slow  # FSDP2 against DDP: `make test-all`
def test_fsdp_ranks_skip_and_roll_back_together_and_train_like_ddp(tmp_path):
    """FSDP2 (fully_shard on gloo): norms are combined from shards as √Σ norm², so every decision, every
    gradient norm and the trained weights match the same run under DDP."""
    for scenario in ("nan_param",):  # skips at steps 23–25, then a rollback
        ddp = run_scenario(tmp_path / scenario, scenario)
        fsdp = run_scenario(tmp_path / f"fsdp_{scenario}", f"fsdp_{scenario}")
        assert fsdp[0]["actions"] == fsdp[1]["actions"] == ddp[0]["actions"]
        assert fsdp[0]["restored"] == ddp[0]["restored"]
        for a, b in zip(fsdp[0]["params"], ddp[0]["params"], strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        stores = [RunReader(tmp_path / name / "run") for name in (scenario, f"fsdp_{scenario}")]
        (steps_d, norms_d), (steps_f, norms_f) = (s.signal("grad/norm") for s in stores)
        assert steps_d.tolist() == steps_f.tolist()
        assert norms_f.tolist() == pytest.approx(norms_d.tolist(), rel=1e-4, nan_ok=True)
        assert stores[1].meta()["distributed"]["sharded"] is True
        for s in stores:
            s.close()
