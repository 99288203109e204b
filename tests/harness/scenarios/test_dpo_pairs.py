"""The preference scenarios' pieces (`keel.harness.scenarios.rl._dpo`): the pair sets and the CHES the filter ranks by.

The CHES check is a hand computation from the definition (Razin et al. 2025, official ``ches/ches.py``): the
last-layer (final LayerNorm) states at the positions that predict each of the R response bytes, P−1 … P+R−2.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from keel.harness.scenarios.rl._dpo import PROMPT, RESPONSE, Pairs, ches
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


def test_scenario_ches_uses_the_states_predicting_every_response_byte_as_the_official_code():
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
