"""Activation RMS/max-abs: float64 references, low precision, non-finite origin, HF blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from keel.proxy import create_proxy_model
from keel.signals.activation_rms import ActivationRmsConfig, ActivationRmsProbe, activation_stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_stats_match_float64(dtype):
    x = (torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ref = x.double().numpy()
    sq, n, top = activation_stats(x)
    assert float(n) == ref.size
    assert float(sq) == pytest.approx(float((ref**2).sum()), rel=1e-5)
    assert float(top) == float(np.abs(ref).max())
    zeros = activation_stats(torch.zeros(3, dtype=dtype))
    assert float(zeros[0]) == 0.0 and float(zeros[2]) == 0.0


def test_nan_and_inf_show():
    assert math.isnan(float(activation_stats(torch.tensor([1.0, math.nan]))[2]))
    assert float(activation_stats(torch.tensor([1.0, -math.inf]))[2]) == math.inf


def test_probe_on_proxy_matches_block_outputs():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = ActivationRmsProbe()
    probe.attach(model)
    outputs = []
    handles = [b.register_forward_hook(lambda m, a, o: outputs.append(o.detach().double())) for b in model.blocks]
    model(torch.randint(0, 256, (2, 16)))
    for h in handles:
        h.remove()
    got = probe.read()
    assert got["act/rms/"].names == ("blocks.0", "blocks.1")
    for value, out in zip(got["act/rms/"].values.tolist(), outputs):
        assert value == pytest.approx(float(out.square().mean().sqrt()), rel=1e-5)
    assert float(got["act/max_abs"]) == pytest.approx(max(float(o.abs().max()) for o in outputs), rel=1e-6)
    probe.detach()


def test_first_non_finite_block_is_visible_in_forward_order():
    class Blow(nn.Module):
        def forward(self, x):
            return x * math.inf

    model = nn.Sequential()
    model.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)])
    model.forward = lambda x: model.layers[2](model.layers[1](model.layers[0](x)) * math.inf)  # born after layer 1
    probe = ActivationRmsProbe()
    probe.attach(model)
    model(torch.ones(1, 3))
    family = probe.read()["act/max_abs/"]
    finite = [math.isfinite(v) for v in family.values.tolist()]
    assert family.names == ("layers.0", "layers.1", "layers.2") and finite == [True, True, False]
    probe.detach()


def test_hugging_face_block_tuples_and_validation():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32,
                                                                 n_positions=16, bos_token_id=0, eos_token_id=0))
    probe = ActivationRmsProbe()
    probe.attach(model)
    model(torch.randint(0, 32, (1, 8)))
    assert probe.read()["act/rms/"].names == ("transformer.h.0", "transformer.h.1")
    probe.detach()
    with pytest.raises(ValueError, match=r"ActivationRmsConfig.every=0; allowed: an int >= 1"):
        ActivationRmsConfig(every=0)
