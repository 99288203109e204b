"""The preference/RL presets: what they hold, that a Guard takes them beside the defaults and reads the loop's
signals, and that every finding kind they emit is explained by the cause catalogue with sourced advice."""

from __future__ import annotations

import torch

import keel
from keel.detect import CAUSES, default_detectors, policy_detectors, preference_detectors
from keel.signals import policy_signals
from tests.detect import rl_series
from tests.detect.rl_series import feed

RL_KINDS = (
    "likelihood_displacement",
    "policy_entropy_collapse",
    "kl_blowup",
    "reward_overoptimization",
    "length_explosion",
    "clip_saturation",
    "dead_groups",
    "truncation_starvation",
)


def test_the_presets_hold_the_rl_detectors():
    assert [d.name for d in preference_detectors()] == ["likelihood_displacement"]
    assert {d.name for d in policy_detectors()} == set(RL_KINDS) - {"likelihood_displacement", "truncation_starvation"}
    assert not {d.name for d in default_detectors()} & set(RL_KINDS)  # pre-training runs do not pay for them


def test_every_rl_kind_has_a_named_cause_with_sourced_advice():
    for kind in RL_KINDS:
        cause = CAUSES.get(kind)
        assert cause is not None, kind
        assert cause.mechanism and len(cause.advice) >= 2, kind
        assert all(a.action and a.source for a in cause.advice), kind


CITED = {  # each kind's first advice cites the source the issue names
    "likelihood_displacement": "2410.08847",
    "policy_entropy_collapse": "2503.14476",
    "kl_blowup": "trl#3015",
    "reward_overoptimization": "2310.02743",
    "length_explosion": "2503.14476",
    "clip_saturation": "2503.14476",
    "dead_groups": "2503.14476",
    "truncation_starvation": "trl#5697",
}


def test_findings_carry_the_catalogue_advice():
    cases = [
        (preference_detectors()[0], rl_series.dpo(0, fall_from=150)),
        (policy_detectors()[0], rl_series.entropy(0, collapse_from=100)),
        (policy_detectors()[1], rl_series.kl(0, blow_from=300)),
        (policy_detectors()[2], rl_series.rewards(0, spread_from=150, gold_peak=300)),
        (policy_detectors()[3], rl_series.lengths(0, explode_from=200)),
        (policy_detectors()[4], rl_series.clips(0, climb_from=200)),
        (policy_detectors()[5], rl_series.groups(0, dead_from=300)),
        (policy_detectors()[5], rl_series.groups(0, dead_from=0, truncated=0.97)),
    ]
    seen = set()
    for det, run in cases:
        finding = feed(det, run)[0]
        seen.add(finding.kind)
        assert finding.advice.startswith("1. "), finding.kind
        assert CITED[finding.kind] in finding.advice + str(finding.evidence["advice"]), finding.kind
        assert finding.cause.endswith(CAUSES[finding.kind].mechanism)
    assert seen == set(RL_KINDS)


def test_a_guard_with_the_policy_preset_reads_the_loops_signals():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    detectors = [*default_detectors(), *policy_detectors()]
    with keel.Guard(model, optimizer, policy="observe", detectors=detectors) as guard:
        for step in range(40):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            entropy = torch.full((2, 3), 2.0 * 0.9 ** max(0, step - 10))  # collapses from step 10
            guard.step(loss, signals=policy_signals(entropies=entropy))
            optimizer.zero_grad(set_to_none=True)
        kinds = {f.kind for f in guard.findings}
    assert "policy_entropy_collapse" in kinds
