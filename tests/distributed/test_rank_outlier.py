"""RankOutlierDetector on synthetic per-rank traces with known fault steps: exact detection steps, no false alarms."""

from __future__ import annotations

import math
import random

import pytest

from keel._core.observation import Observation
from keel.guard.rank_outlier import RankOutlierConfig, RankOutlierDetector


def trace(
    world: int,
    steps: int,
    *,
    seed: int = 0,
    bad_rank: int | None = None,
    bad_from: int = 0,
    loss_factor: float = 1.0,
    norm_factor: float = 1.0,
    cos_bad: float | None = None,
    outliers: bool = True,
):
    """Per-rank loss, local gradient norm and cosine of a run whose loss decays from 4 to ~1 (every rank alike).

    Healthy ranks differ only by minibatch noise (and, with ``outliers``, a one-batch 3x loss now and then);
    ``bad_rank`` from ``bad_from`` on has its loss and norm multiplied and its cosine set to ``cos_bad``.
    """
    rng = random.Random(seed)
    for step in range(steps):
        level = 1.0 + 3.0 * math.exp(-step / 60)
        loss, norm, cos = [], [], []
        for r in range(world):
            bad = r == bad_rank and step >= bad_from
            l_r = level * (1 + 0.05 * rng.gauss(0, 1))
            if outliers and rng.random() < 0.01:
                l_r *= 3.0
            n_r = 0.5 * level * math.exp(0.1 * rng.gauss(0, 1))
            c_r = 0.6 + 0.05 * rng.gauss(0, 1)
            loss.append(l_r * (loss_factor if bad else 1))
            norm.append(n_r * (norm_factor if bad else 1))
            cos.append(cos_bad if bad and cos_bad is not None else c_r)
        names = tuple(str(r) for r in range(world))
        yield Observation(
            step=step,
            per_param={
                "rank/loss/": (names, loss),
                "rank/grad/local_norm/": (names, norm),
                "rank/grad/cos/": (names, cos),
            },
        )


def run(detector: RankOutlierDetector, observations) -> list:
    return [f for obs in observations for f in detector.update(obs)]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_ranks_raise_nothing(world, seed):
    assert run(RankOutlierDetector(), trace(world, 1000, seed=seed)) == []


def test_a_rank_whose_shard_goes_bad_is_named_once_half_the_short_window_is_bad():
    found = run(RankOutlierDetector(), trace(2, 300, bad_rank=1, bad_from=150, loss_factor=2.0))
    assert [(f.step, f.evidence["rank"], f.evidence["feature"], f.evidence["rule"]) for f in found] == [
        (154, 1, "loss", "onset")
    ]  # the 5th bad step: the median of the last 9 has turned
    [f] = found
    assert f.kind == "rank_outlier" and f.severity == "warning" and f.signal == "rank/loss/1"
    assert "Rank 1" in f.cause and "MUD-HoG" in f.advice


def test_a_persistently_different_rank_is_named_when_the_warmup_ends():
    found = run(
        RankOutlierDetector(RankOutlierConfig(warmup=30)),
        trace(4, 200, bad_rank=3, loss_factor=1.5, norm_factor=2.0, cos_bad=0.1),
    )
    assert {(f.step, f.evidence["rank"], f.evidence["rule"]) for f in found} == {(30, 3, "persistent")}
    assert sorted(f.evidence["feature"] for f in found) == ["disagreement", "grad_norm", "loss"]


def test_a_small_gradient_change_on_one_rank_is_named_by_its_norm():
    found = run(RankOutlierDetector(), trace(3, 400, bad_rank=0, bad_from=200, norm_factor=1.5))
    assert [(f.evidence["rank"], f.evidence["feature"]) for f in found] == [(0, "grad_norm")]
    assert 204 <= found[0].step <= 208


def test_with_two_ranks_the_shared_cosine_names_no_one():
    def shared_cosine():
        for obs in trace(2, 300, bad_rank=1, bad_from=100, cos_bad=0.05):
            names, values = obs.per_param["rank/grad/cos/"]
            obs.per_param["rank/grad/cos/"] = (names, [values[1]] * 2)  # as RankSync computes it for 2 ranks
            yield obs

    assert run(RankOutlierDetector(), shared_cosine()) == []  # each rank is the other's only reference


def test_a_change_common_to_every_rank_is_training_not_a_fault():
    def every_rank_jumps():
        for obs in trace(4, 300):
            if obs.step >= 150:
                for family in ("rank/loss/", "rank/grad/local_norm/"):
                    names, values = obs.per_param[family]
                    obs.per_param[family] = (names, [3 * v for v in values])
            yield obs

    assert run(RankOutlierDetector(), every_rank_jumps()) == []


def test_one_episode_gives_one_finding_and_a_recovered_rank_can_be_named_again():
    def episodes():
        for obs in trace(3, 500):
            if 150 <= obs.step < 200 or obs.step >= 400:
                names, values = obs.per_param["rank/loss/"]
                obs.per_param["rank/loss/"] = (names, [v * (2.0 if r == 2 else 1.0) for r, v in enumerate(values)])
            yield obs

    found = run(RankOutlierDetector(), episodes())
    assert [(f.step, f.evidence["rank"]) for f in found] == [(154, 2), (404, 2)]


def test_non_finite_on_one_rank_names_it_and_on_every_rank_names_no_one():
    det = RankOutlierDetector()
    names = ("0", "1", "2")
    found = det.update(Observation(step=5, per_param={"rank/loss/": (names, [1.0, math.nan, 1.0])}))
    assert [(f.evidence["rule"], f.evidence["ranks"], f.signal) for f in found] == [("non_finite", [1], "rank/loss/1")]
    assert det.update(Observation(step=6, per_param={"rank/loss/": (names, [math.nan] * 3)})) == []


def test_replicas_with_different_averaged_gradients_are_named():
    det = RankOutlierDetector()
    names = ("0", "1", "2")
    [f] = det.update(Observation(step=3, per_param={"rank/grad/norm/": (names, [1.0, 1.0, 1.5])}))
    assert f.evidence["rule"] == "replica_mismatch" and f.evidence["ranks"] == [2]
    [f] = det.update(Observation(step=4, per_param={"rank/grad/norm/": (("0", "1"), [1.0, 1.5])}))
    assert f.evidence["ranks"] == [] and "cannot tell" in f.cause
    assert det.update(Observation(step=5, per_param={"rank/grad/norm/": (names, [1.0] * 3)})) == []
    sharded = RankOutlierDetector(RankOutlierConfig(replicated=False))  # FSDP shards differ by design
    assert sharded.update(Observation(step=3, per_param={"rank/grad/norm/": (names, [1.0, 1.0, 1.5])})) == []


def test_state_dict_round_trip_continues_identically():
    observations = list(trace(3, 300, bad_rank=1, bad_from=220, loss_factor=1.8))
    a = RankOutlierDetector()
    run(a, observations[:200])
    b = RankOutlierDetector()
    b.load_state_dict(a.state_dict())
    rest_a, rest_b = run(a, observations[200:]), run(b, observations[200:])
    assert [f.to_dict() for f in rest_a] == [f.to_dict() for f in rest_b] and rest_a


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(warmup=0), r"RankOutlierConfig.warmup=0; allowed: an int >= 1"),
        (dict(short_window=0), r"RankOutlierConfig.short_window=0; allowed: an int >= 1"),
        (dict(warmup=9), r"RankOutlierConfig.warmup=9; allowed: > short_window \(9\)"),
        (dict(long_alpha=1.0), r"long_alpha=1.0; allowed: 0 < long_alpha < 1"),
        (dict(z=-1.0), r"RankOutlierConfig.z=-1.0; allowed: a finite number > 0"),
    ],
)
def test_bad_config_names_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankOutlierConfig(**kwargs)
