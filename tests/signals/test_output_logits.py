"""Output-logit statistics and probe: log Z, scale, softmax collapse and zero loss against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keel.proxy import create_proxy_model
from keel.signals.logit_stats import (
    log_partition,
    softmax_collapse_fraction,
    softmax_collapse_mask,
    zero_loss_fraction,
)
from keel.signals.output_logits import OutputLogitsConfig, OutputLogitsProbe

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def logits(seed=0, shape=(6, 9), scale=4.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_partition_matches_float64(dtype):
    z = logits().to(dtype)
    x = z.double().numpy()
    m = x.max(-1, keepdims=True)
    expected = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(log_partition(z).numpy(), expected, rtol=1e-6 if dtype != torch.float64 else 1e-12)


def test_log_partition_masked_and_nan():
    z = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf] * 3, [math.nan, 0.0, 0.0]])
    got = log_partition(z)
    assert got[0] == 0.0 and got[1] == -math.inf and math.isnan(got[2])


def test_softmax_collapse_depends_on_the_working_precision():
    # a gap of 12 leaves Σ exp = 1 + 2·6.1e-6: above float32's half-ulp of 1 (6e-8), below float16's (4.9e-4)
    z = torch.tensor([[0.0, -12.0, -12.0], [0.0, -1.0, -2.0], [0.0, -200.0, -300.0]])
    expected = {torch.float64: [False, False, True], torch.float32: [False, False, True],
                torch.bfloat16: [True, False, True], torch.float16: [True, False, True]}
    for dtype, want in expected.items():
        collapsed, s = softmax_collapse_mask(z, dtype)
        ref = np.exp(z.to(dtype).double().numpy() - 0.0)  # reference sum in float64 of the rounded logits
        assert collapsed.tolist() == want, dtype
        assert s.dtype == dtype and float(s[1]) == pytest.approx(ref[1].sum(), rel=1e-2)
    assert float(softmax_collapse_fraction(z, torch.float16)) == pytest.approx(2 / 3)
    assert float(softmax_collapse_fraction(z)) == pytest.approx(1 / 3)  # default: the logits' own dtype


def test_zero_loss_needs_the_target_to_be_the_max():
    z = torch.tensor([[0.0, -200.0], [0.0, -200.0], [0.0, -1.0]])
    y = torch.tensor([0, 1, 0])
    reference = (-F.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1) == 0).float().mean()
    assert float(zero_loss_fraction(z, y)) == float(reference) == pytest.approx(1 / 3)


def test_probe_on_proxy_matches_the_head_output():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = OutputLogitsProbe()
    probe.attach(model)
    idx = torch.randint(0, 256, (3, 16))
    out = model(idx).detach().double()
    got = probe.read()
    lse = torch.logsumexp(out, -1)
    assert float(got["logits/log_z"]) == pytest.approx(float(lse.mean()), rel=1e-6)
    assert float(got["logits/log_z_max"]) == pytest.approx(float(lse.max()), rel=1e-6)
    assert float(got["logits/log_z_min"]) == pytest.approx(float(lse.min()), rel=1e-6)
    assert float(got["logits/rms"]) == pytest.approx(float(out.square().mean().sqrt()), rel=1e-5)
    assert float(got["logits/mean"]) == pytest.approx(float(out.mean()), rel=1e-4, abs=1e-7)
    assert float(got["logits/softmax_collapse"]) == 0.0
    assert "logits/zero_loss" not in got
    probe.detach()


def test_targets_from_set_targets_and_from_hugging_face_labels():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 3, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[300.0, 0.0], [0.0, 0.0], [-300.0, 0.0]]))

        def forward(self, x, labels=None):
            return self.head(x)

    model = Head()
    probe = OutputLogitsProbe()
    probe.attach(model)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    probe.set_targets(torch.tensor([0, 1, 0]))
    model(x)
    got = probe.read()
    assert float(got["logits/softmax_collapse"]) == pytest.approx(2 / 3)  # rows 0, 1 collapsed; row 2 uniform
    assert float(got["logits/zero_loss"]) == pytest.approx(1 / 3)  # only row 0's target is its max
    # Hugging Face style: labels passed to forward, shifted by one, -100 ignored
    model(x.unsqueeze(0), labels=torch.tensor([[-100, 0, -100]]))
    got = probe.read()
    assert float(got["logits/zero_loss"]) == 1.0  # position 0 predicts label 0: collapsed and right
    probe.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_head_is_judged_in_its_own_precision(dtype):
    head = nn.Linear(4, 5).to(dtype)
    probe = OutputLogitsProbe()
    probe.attach(head)
    x = torch.randn(7, 4).to(dtype) * 3
    out = head(x).detach()
    got = probe.read()
    assert float(got["logits/softmax_collapse"]) == float(softmax_collapse_fraction(out))
    assert float(got["logits/log_z"]) == pytest.approx(float(torch.logsumexp(out.double(), -1).mean()), rel=1e-6)
    probe.detach()


def test_nan_logits_and_schedule_and_validation():
    head = nn.Linear(2, 3)
    probe = OutputLogitsProbe(every=2)
    probe.attach(head)
    head(torch.tensor([[math.nan, 0.0]]))
    assert math.isnan(float(probe.read()["logits/log_z"]))
    from tests.signals.test_attn_logits import _ctx

    seen = []
    for step in range(4):
        head(torch.randn(2, 2))
        seen.append(bool(probe.measure(_ctx(step))))
    assert seen == [True, False, True, False]  # due at steps 0 and 2
    with pytest.raises(ValueError, match=r"OutputLogitsConfig.precision='fp8'; allowed: None, float16"):
        OutputLogitsConfig(precision="fp8")
    probe.detach()
