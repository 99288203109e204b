"""RankSync's reduction rules and the per-rank cosine, against float64 references; one torchrun for the collective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from keel.guard.distributed import DistributedConfig, RankSync, leave_one_out_cosine, reduction_rule
from tests.distributed.launch import torchrun


@pytest.mark.parametrize(
    "key,replicated,sharded",
    [
        ("loss", "mean", "mean"),
        ("grad/norm", "mean", "norm"),
        ("grad/norm/", "mean", "norm"),
        ("param/norm/", "mean", "norm"),
        ("update/norm", "mean", "norm"),
        ("update/ratio/", "mean", "mean"),
        ("attn/max_logit/", "max", "max"),
        ("act/max_abs", "max", "max"),
        ("logits/log_z_max", "max", "max"),
        ("logits/log_z_min", "min", "min"),
        ("attn/entropy/", "mean", "mean"),
        ("grad/weight_cos", "mean", "mean"),
    ],
)
def test_reduction_rules(key, replicated, sharded):
    assert reduction_rule(key, sharded=False) == replicated
    assert reduction_rule(key, sharded=True) == sharded


@pytest.mark.parametrize("world", [2, 3, 5])
def test_leave_one_out_cosine_matches_a_float64_reference(world):
    g = torch.randn(world, 50, generator=torch.Generator().manual_seed(world), dtype=torch.float64)
    mean = g.mean(0)
    got = leave_one_out_cosine(g.pow(2).sum(1), g @ mean, mean.dot(mean).expand(world), world)
    for r in range(world):
        others = torch.cat([g[:r], g[r + 1 :]]).mean(0)
        want = torch.nn.functional.cosine_similarity(g[r], others, dim=0)
        assert got[r].item() == pytest.approx(want.item(), abs=1e-12)


def test_leave_one_out_cosine_of_a_zero_gradient_is_nan():
    g = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    mean = g.mean(0)
    got = leave_one_out_cosine(g.pow(2).sum(1), g @ mean, mean.dot(mean).expand(2), 2)
    assert math.isnan(got[0].item()) and math.isnan(got[1].item())


def test_a_single_process_gets_no_sync_and_asking_for_one_without_a_group_fails():
    model = torch.nn.Linear(2, 2)
    assert RankSync.create(model, None) is None and RankSync.create(model, False) is None
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        RankSync.create(model, True)
    with pytest.raises(ValueError, match="distributed='yes'; allowed"):
        RankSync.create(model, "yes")
    with pytest.raises(ValueError, match=r"DistributedConfig.sharded='auto'; allowed"):
        DistributedConfig(sharded="auto")


@pytest.mark.distributed
def test_two_ranks_reduce_by_the_documented_rules(tmp_path):
    out = tmp_path / "reduced.json"
    torchrun(Path(__file__).with_name("reduce_worker.py"), str(out))
    result = json.loads(out.read_text())
    expected = (("False", 3.5, [1.5, 3.0], 2.0), ("True", 5.0, [5**0.5, 20**0.5], 8**0.5))
    for sharded, norm, family, late in expected:
        values, per_param = result[sharded]["values"], result[sharded]["per_param"]
        assert values["loss"] == 1.5
        assert values["grad/norm"] == pytest.approx(norm, rel=1e-12)
        assert per_param["grad/norm/"][0] == ["a", "b"]
        assert per_param["grad/norm/"][1] == pytest.approx(family, rel=1e-12)
        assert values["attn/max_logit"] == 20.0 and values["logits/log_z_min"] == -2.0
        assert values["act/rms"] is None or math.isnan(values["act/rms"])  # JSON writes NaN as NaN
        assert per_param["rank/loss/"] == [["0", "1"], [1.0, 2.0]]
        assert per_param["rank/grad/norm/"] == [["0", "1"], [3.0, 4.0]]
        assert result[sharded]["late"]["update/norm"] == pytest.approx(late, rel=1e-12)


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


class HostReads:
    """Counts the Python-level calls that copy a tensor's value to the host (a sync on an accelerator)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> HostReads:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counting(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_a_single_process_guard_step_reads_the_host_once_per_step():
    from keel import Guard
    from tests.conftest import TinyNet, make_batches

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)  # reads nothing itself (AdamW on CPU does)
    guard = Guard(model, opt, policy="skip", log_every=5)
    assert guard.dist is None  # no process group: the distributed path is not even built
    reads = []
    for x, y in make_batches(12):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        with HostReads() as counter:
            guard.step(loss)
        reads.append(counter.count)
        opt.zero_grad(set_to_none=True)
    guard.close()
    assert reads == [1] * 12  # the one packed copy, on log steps and in between


@pytest.mark.distributed
def test_keys_only_some_ranks_pack_stay_their_own_and_uneven_inputs_do_not_kill_the_job(tmp_path):
    torchrun(Path(__file__).with_name("layout_worker.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(ranks):
        got = result["reduced"]
        assert got["values"]["loss"] == 1.5 and got["again"]["loss"] == 1.5  # shared: the mean, in any order
        assert got["per_param"]["grad/norm/"] == [["a", "b"], [1.5, 3.0]]
        assert got["per_param"]["rank/loss/"] == [["0", "1"], [1.0, 2.0]]
        assert got["late"]["update/norm"] == 3.0
        [warning] = got["warnings"]  # once, naming this rank's own keys
        # same keys on every rank: the layout check and the values, then the values alone (test_agreement.py: more)
        assert got["healthy"] == [1.5, 2.5, 3.5] and got["healthy_collectives"] == [2, 1, 1]
        if rank == 0:
            assert got["values"]["tps"] == 1234.0 and got["per_param"]["own/"] == [["x"], [7.0]]
            assert "attn/max_logit" not in got["values"] and "own/, tps" in warning
        else:
            assert got["values"]["attn/max_logit"] == 5.0 and "tps" not in got["values"]
            assert "attn/max_logit but not every rank did" in warning
    # a Guard whose loop gives signals= and grad_norm= on rank 0 only runs to the end on both ranks, in step
    assert ranks[0]["guarded"]["actions"] == ranks[1]["guarded"]["actions"] == ["ok"] * 6
    assert ranks[0]["guarded"]["params"] == ranks[1]["guarded"]["params"]
    # inside DDP's model.join() with uneven inputs every rank finishes its own batches; the one that goes on alone is
    # told that keel no longer agrees across ranks (tests/distributed/test_join.py: agreement until a rank runs out)
    # FSDP2 with the loop's clipping: its DTensor norm is taken as its full value; the NaN gradient is skipped on both
    assert ranks[0]["fsdp_clipped"] == ranks[1]["fsdp_clipped"] == ["ok"] * 3 + ["skip"] + ["ok"] * 2
    assert [r["uneven"]["steps"] for r in ranks] == [4, 6]
    assert ranks[0]["uneven"]["warnings"] == []
    [said] = ranks[1]["uneven"]["warnings"]
    assert "another rank ran out of batches inside DDP's join" in said


def test_the_gloo_twin_of_a_non_gloo_world_is_made_once_for_every_guard(tmp_path):
    import torch.distributed as dist

    from keel.guard.distributed import _host_group

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("cpu:gloo", store=store, rank=0, world_size=1)
    try:
        first, device = _host_group(dist.group.WORLD)  # "cpu:gloo" is not "gloo": a twin is made (V21: per Guard)
        assert first is not dist.group.WORLD and device.type == "cpu"
        assert all(_host_group(dist.group.WORLD)[0] is first for _ in range(5))
    finally:
        dist.destroy_process_group()
