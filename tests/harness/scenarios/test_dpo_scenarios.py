"""The preference scenarios: their pair sets, the CHES the filter ranks by, how `dpo_displacement` runs its remedies,
and (slow) the CHES filter's effect on the full mixed set.

The CHES check is a hand computation from the definition (Razin et al. 2025, official ``ches/ches.py``): the
last-layer (final LayerNorm) states at the positions that predict each of the R response bytes, P−1 … P+R−2.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from keel.harness.scenarios.rl._dpo import PROMPT, RESPONSE, Pairs, ches, corpus_pairs
from keel.proxy.model import create_proxy_model


def _hand_ches(model, prompt: list[int], chosen: list[int], rejected: list[int]) -> float:
    """Length-normalised CHES of one pair, position by position in float64."""
    means = []
    states: list[Tensor] = []
    hook = model.ln_f.register_forward_hook(lambda module, args, out: states.append(out[0].double()))
    for response in (chosen, rejected):
        with torch.no_grad():
            model(torch.tensor([prompt + response]))
        h = states[-1]  # (P + R, d)
        predicting = [h[len(prompt) - 1 + k] for k in range(len(response))]  # the state that predicts byte k
        means.append(sum(predicting) / len(response))
    hook.remove()
    m_pos, m_neg = means
    return float(m_pos @ m_neg - m_pos @ m_pos)


def _bump(byte: Tensor) -> Tensor:
    return (byte + 1 - 32) % 95 + 32  # another printable byte


def test_scenario_ches_uses_the_states_predicting_every_response_byte_as_the_official_code(one_torch_thread):
    torch.manual_seed(0)
    model = create_proxy_model("tiny").eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(32, 127, (3, PROMPT), generator=g)
    chosen = torch.randint(32, 127, (3, RESPONSE), generator=g)
    rejected = chosen.clone()
    rejected[0, -1] = _bump(rejected[0, -1])  # the last byte: only the state AT it differs, which predicts nothing
    rejected[1, -2] = _bump(rejected[1, -2])  # the second-to-last: the state predicting the last byte differs
    rejected[2] = torch.randint(32, 127, (RESPONSE,), generator=g)
    pairs = Pairs(prompts=prompts, chosen=chosen, rejected=rejected)
    triples = zip(prompts.tolist(), chosen.tolist(), rejected.tolist(), strict=True)
    expected = [_hand_ches(model, p, c, r) for p, c, r in triples]
    assert expected[0] == 0.0 and expected[1] != 0.0
    assert ches(model, pairs).tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_mixed_set_holds_near_pairs_then_distinct_ones():
    pairs = corpus_pairs(3, 9, "mixed")
    assert len(pairs) == 9 and pairs.prompts.shape == (9, PROMPT) and pairs.rejected.shape == (9, RESPONSE)
    differing = (pairs.chosen != pairs.rejected).sum(dim=1).tolist()
    assert differing[:4] == [1, 1, 1, 1]  # n // 2 near pairs: one byte replaced …
    assert all(int(i) < RESPONSE // 2 for i in (pairs.chosen[:4] != pairs.rejected[:4]).nonzero()[:, 1])  # … early
    assert min(differing[4:]) > RESPONSE // 2  # then distinct: another corpus text
    near = corpus_pairs(3, 4, "near")  # the near half is the near set of the same seed
    assert torch.equal(pairs.rejected[:4], near.rejected)


def test_an_unknown_pair_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"kind='similar'; allowed: near, distinct, mixed"):
        corpus_pairs(0, 4, "similar")


def test_the_filter_and_its_random_control_train_only_their_kept_half_for_the_full_runs_epochs(
    monkeypatch, one_torch_thread
):
    from keel.guard.console import silenced
    from keel.harness.scenarios.rl import _dpo, dpo_displacement

    def tiny_start(seed, kind, setting):
        torch.manual_seed(seed)
        return create_proxy_model("tiny", seq_len=64), corpus_pairs(seed + 1, setting.pairs, kind)

    calls = []

    def spy(model, pairs, recipe, *, seed, guarded):
        calls.append((pairs, recipe, guarded))
        return _dpo.train_dpo(model, pairs, recipe, seed=seed, guarded=guarded)

    monkeypatch.setattr(dpo_displacement, "QUICK", _dpo.DPOSetting(base_steps=0, pairs=4, sft_steps=0, dpo_steps=2))
    monkeypatch.setattr(dpo_displacement, "sft_start", tiny_start)
    monkeypatch.setattr(dpo_displacement, "train_dpo", spy)
    with silenced():
        run = dpo_displacement.DPODisplacement().run(seed=0, quick=True)
    (plain, _, guarded), (_, anchored, _), (by_ches, filtered, _), (at_random, control, _) = calls
    assert guarded and len(plain) == 4 and anchored.sft_alpha == 1.0  # keel watches the unfiltered run
    assert len(by_ches) == len(at_random) == 2 and filtered.steps == control.steps == 1  # half the pairs, same epochs
    effect = run.effect
    assert effect["pairs"] == "2 near-identical + 2 distinct"
    for name in ("ches_filter_drop_0.5", "random_drop_0.5"):
        record = effect["with"][name]
        assert set(record) == {"all_pairs", "kept_pairs", "kept_pairs_in_unfiltered_run", "near_pairs_dropped"}
        assert all(math.isfinite(record[k]) for k in ("all_pairs", "kept_pairs", "kept_pairs_in_unfiltered_run"))
        assert record["near_pairs_dropped"].endswith("/2")
    assert effect["without"] == pytest.approx(
        (effect["without_near_pairs"] + effect["without_distinct_pairs"]) / 2, abs=2e-3
    )


@pytest.mark.slow
def test_on_the_full_mixed_set_ches_drops_the_near_pairs_and_its_kept_pairs_lose_less_than_a_random_drops(
    one_torch_thread,
):
    """The bench's seed 0, full size (~40 s on one thread). On seeds 0–4 CHES dropped 22–28 of the 32 near pairs and
    its kept pairs lost less than the random drop's in 5 of 5, less than in the unfiltered run in 4 of 5 (not seed 4).
    The kept pairs' chosen likelihood still falls (distinct pairs displace at this LR too), and the quick size shows
    no reliable effect: every seed's figures are in BENCHMARKS.md (keel bench rl)."""
    from keel.harness.bench import rl as bench

    s = bench.score_scenario("dpo_displacement", quick=False)
    assert s.keel.detected and s.keel.kind == "likelihood_displacement"  # on the unfiltered run
    effect = s.effect
    assert effect["without"] < -1.0 and effect["without_near_pairs"] < effect["without_distinct_pairs"]
    assert effect["with"]["sft_regularizer_alpha_1"] > 0
    by_ches, at_random = effect["with"]["ches_filter_drop_0.5"], effect["with"]["random_drop_0.5"]
    assert int(by_ches["near_pairs_dropped"].split("/")[0]) >= 20  # of 32; a random half drops ~16
    assert by_ches["kept_pairs"] > at_random["kept_pairs"]
    assert by_ches["kept_pairs"] > by_ches["kept_pairs_in_unfiltered_run"]
