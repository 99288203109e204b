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
    for value, out in zip(got["act/rms/"].values.tolist(), outputs, strict=True):
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
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    probe = ActivationRmsProbe()
    probe.attach(model)
    model(torch.randint(0, 32, (1, 8)))
    assert probe.read()["act/rms/"].names == ("transformer.h.0", "transformer.h.1")
    probe.detach()
    with pytest.raises(ValueError, match=r"ActivationRmsConfig.every=0; allowed: an int >= 1"):
        ActivationRmsConfig(every=0)


class _Stack(nn.Module):
    """Blocks in a ModuleList whose outputs the model does not use the usual way."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])

    def forward(self, x):
        for b in self.blocks:
            b(x)
        return x


class _IntBlock(nn.Module):  # e.g. a router returning expert indices
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).argmax(-1)


class _ComplexBlock(nn.Module):  # e.g. a spectral (FFT) layer
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.fft.fft(self.lin(x))


def test_integer_block_outputs_are_skipped_and_never_break_the_forward():
    # the old hook ran vector_norm on a Long tensor inside the user's forward: training crashed
    probe = ActivationRmsProbe()
    model = _Stack(_IntBlock)
    probe.attach(model)
    model(torch.randn(2, 4))
    assert probe.read() == {}
    probe.detach()


def test_complex_block_outputs_are_measured_over_their_real_and_imaginary_parts():
    probe = ActivationRmsProbe()
    model = _Stack(_ComplexBlock)
    probe.attach(model)
    x = torch.randn(2, 4)
    out = torch.view_as_real(model.blocks[0](x)).double()
    model(x)
    got = probe.read()
    assert float(got["act/rms"]) == pytest.approx(float(out.square().mean().sqrt()), rel=1e-5)
    assert float(got["act/max_abs"]) == pytest.approx(float(out.abs().max()), rel=1e-6)
    probe.detach()


def test_a_failing_hook_is_reported_at_read_not_in_the_forward(monkeypatch):
    import keel.signals.activation_rms as module

    probe = ActivationRmsProbe()
    model = create_proxy_model("tiny", seq_len=8)
    probe.attach(model)
    monkeypatch.setattr(module, "activation_stats", lambda x: 1 / 0)
    model(torch.randint(0, 256, (1, 8)))  # the user's forward still runs
    with pytest.raises(RuntimeError, match="activation hook failed"):
        probe.read()
    probe.detach()


def test_recurrent_models_are_not_expected_to_have_blocks_or_attention(recwarn):
    class LSTMModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lstm, self.out = nn.Embedding(10, 8), nn.LSTM(8, 8), nn.Linear(8, 10)

    from keel.signals.attn_logits import AttnLogitsProbe

    ActivationRmsProbe().attach(LSTMModel())
    AttnLogitsProbe().attach(LSTMModel())
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize(
    ("dtype", "autocast", "expected"),
    [
        (torch.float32, None, torch.finfo(torch.float32).max),
        (torch.float32, torch.float16, 65504.0),  # block outputs stay float32, the next matmul casts them to fp16
        (torch.float32, torch.bfloat16, torch.finfo(torch.bfloat16).max),
        (torch.float16, None, 65504.0),
        (torch.float64, None, torch.finfo(torch.float32).max),  # beyond float32's range: as good as unbounded
    ],
    ids=["fp32", "fp32-autocast-fp16", "fp32-autocast-bf16", "fp16", "fp64"],
)
def test_the_probe_reports_the_format_block_outputs_are_held_in(dtype, autocast, expected):
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(dtype)
    probe = ActivationRmsProbe()
    probe.attach(model)
    tokens = torch.randint(0, 256, (2, 16))
    if autocast is None:
        model(tokens)
    else:
        with torch.autocast("cpu", dtype=autocast):
            model(tokens)
    assert float(probe.read()["act/format_max"]) == pytest.approx(expected, rel=1e-6)
    assert probe.read() == {}  # read starts a new step: nothing measured, nothing reported
    probe.detach()
