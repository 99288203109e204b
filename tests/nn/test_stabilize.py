"""keel.stabilize on the proxy GPT, a nanoGPT-style block and nn.MultiheadAttention stacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import keel.nn.stabilizers as stabilizers_pkg
from keel.losses import z_loss
from keel.nn import (
    QKNorm,
    QKNormMultiheadAttention,
    SigmaReparam,
    StabilizerNoEffectWarning,
    create_stabilizer,
    list_stabilizers,
    stabilize,
)
from keel.optim import OrthoGrad
from keel.proxy import create_proxy_model
from tests.nn._models import NanoGPT


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, result=None, steps: int = 5) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if result is not None:
            loss = loss + result.z_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _batches(vocab: int, n: int = 3, T: int = 16):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, vocab, (4, T), generator=gen), torch.randint(0, vocab, (4, T), generator=gen))
        for _ in range(n)
    ]


def test_proxy_qk_norm_sigma_reparam_z_loss_and_optimizer_groups() -> None:
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    result = stabilize(model, ["z_loss", "sigma_reparam", "qk_norm"], optimizer=opt)
    assert sorted(result.by_stabilizer()) == ["qk_norm", "sigma_reparam", "z_loss"]
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, QKNorm) and attn.q_norm.head_dim == attn.head_dim
    assert result.replaced["blocks.0.attn"] is attn
    # Every new parameter is 1-D or a scalar (norm gains and biases, σReparam's γ) and joins the existing
    # no-decay group, whose other hyper-parameters are the decaying group's: no group was added.
    assert len(opt.param_groups) == 2
    assert result.new_parameters and all(p.dim() < 2 for p in result.new_parameters)
    assert {id(p) for p in result.new_parameters} <= {id(p) for p in opt.param_groups[1]["params"]}
    after = model(x)
    assert not torch.allclose(after, before)  # QK-norm changes the function
    torch.testing.assert_close(result.z_loss(), z_loss(after))
    losses = _train(model, opt, _batches(256), result, steps=8)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_sigma_reparam_alone_is_identity_at_conversion_and_keeps_parameters() -> None:
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    qkv = model.blocks[0].attn.qkv.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, _batches(256), steps=2)  # optimizer state exists and must survive
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    stabilize(model, ["sigma_reparam"], optimizer=opt)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.qkv.parametrizations.weight.original is qkv
    assert "exp_avg" in opt.state[qkv]
    _train(model, opt, _batches(256), steps=2)


def test_state_dict_of_a_stabilized_model_loads_into_another() -> None:
    torch.manual_seed(0)
    a = create_proxy_model("tiny")
    stabilize(a, ["qk_norm", "sigma_reparam"])
    _train(a, torch.optim.AdamW(a.parameters(), lr=1e-2), _batches(256), steps=2)
    b = create_proxy_model("tiny")
    stabilize(b, ["qk_norm", "sigma_reparam"])
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(a(x), b(x))


def test_nanogpt_fused_qkv_is_normalised_per_head_exactly() -> None:
    torch.manual_seed(0)
    model = NanoGPT()
    result = stabilize(model, ["qk_norm", "sigma_reparam", "z_loss"])
    assert result.by_stabilizer()["qk_norm"] == ["attn.0", "attn.1"]
    assert "lm_head" not in result.by_stabilizer()["sigma_reparam"]  # tied to wte: left alone
    assert result.by_stabilizer()["z_loss"] == ["lm_head"]
    attn = model.attn[0]
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 7, 16)
    # Independent re-derivation: LayerNorm over each head of q and k, then causal attention.
    w = attn.c_attn.weight.detach()
    q, k, v = (x @ w.t() + attn.c_attn.bias).split(16, dim=-1)
    heads = lambda t: t.view(2, 7, 2, 8)  # noqa: E731
    q = F.layer_norm(heads(q), (8,), attn.q_norm.weight, attn.q_norm.bias, 1e-5).transpose(1, 2)
    k = F.layer_norm(heads(k), (8,), attn.k_norm.weight, attn.k_norm.bias, 1e-5).transpose(1, 2)
    v = heads(v).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(8) + torch.full((7, 7), float("-inf")).triu(1)
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16)
    expected = y @ attn.c_proj.weight.detach().t() + attn.c_proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = _train(model, opt, _batches(50), result, steps=6)
    assert all(math.isfinite(v) for v in losses)


def test_multihead_attention_stack_is_converted_and_trains() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    old_in_proj = model.layers[0].self_attn.in_proj_weight
    opt = OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-3))
    result = stabilize(model, ["qk_norm", "sigma_reparam"], optimizer=opt)
    attn = model.layers[0].self_attn
    assert isinstance(attn, QKNormMultiheadAttention)
    assert result.replaced["layers.0.self_attn"] is attn
    assert attn.parametrizations.in_proj_weight.original is old_in_proj
    assert isinstance(attn.out_proj.parametrizations.weight[0], SigmaReparam)
    in_base = {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_base for p in result.new_parameters)
    x = torch.randn(3, 5, 16)
    model(x).square().mean().backward()
    opt.step()
    model.train()
    expected = model(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_second_application_changes_nothing_and_warns_once() -> None:
    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    first = stabilize(model, ["qk_norm", "sigma_reparam", "z_loss"])
    norm = model.blocks[0].attn.q_norm
    with pytest.warns(StabilizerNoEffectWarning, match="qk_norm, sigma_reparam") as record:
        second = stabilize(model, ["qk_norm", "sigma_reparam", "z_loss"])
    assert len(record) == 1
    assert second.unmatched == ["qk_norm", "sigma_reparam"]
    assert model.blocks[0].attn.q_norm is norm
    assert second.z_loss_hooks == first.z_loss_hooks  # the existing hook is reused, not doubled
    assert len(model.head._forward_hooks) == 1


def test_nothing_matched_warns_once_naming_every_stabilizer() -> None:
    with pytest.warns(StabilizerNoEffectWarning, match="qk_norm, z_loss matched nothing in Sequential") as record:
        result = stabilize(nn.Sequential(nn.Conv1d(3, 3, 1)), ["qk_norm", "z_loss"])
    assert len(record) == 1 and result.changes == [] and result.z_loss().item() == 0.0


def test_registry_names_are_file_stems_and_bad_requests_raise() -> None:
    stems = sorted(p.stem for p in Path(stabilizers_pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    listed = list_stabilizers()
    assert [name for name, _, _ in listed] == stems
    for _, description, reference in listed:
        assert description and "\n" not in description and "arXiv" in reference
    with pytest.raises(ValueError, match="qk_norm"):
        stabilize(nn.Linear(2, 2), ["qk-norm"])
    with pytest.raises(ValueError, match="each stabilizer once"):
        stabilize(nn.Linear(2, 2), ["z_loss", create_stabilizer("z_loss", coefficient=1e-3)])
    with pytest.raises(ValueError, match="list of names"):
        stabilize(nn.Linear(2, 2), "qk_norm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="QKNormStabilizer.norm="):
        create_stabilizer("qk_norm", norm="batch")


def test_keel_stabilize_is_the_lazy_top_level_name_and_trains_the_proxy() -> None:
    import subprocess
    import sys

    import keel
    import keel.nn

    assert keel.stabilize is keel.nn.stabilize and keel.list_stabilizers is keel.nn.list_stabilizers
    assert {"stabilize", "list_stabilizers"} <= set(keel.__all__)
    # `import keel` alone must still not import torch: the name loads keel.nn on first use.
    code = "import sys, keel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr

    torch.manual_seed(0)
    model = create_proxy_model("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = keel.stabilize(model, ["qk_norm", "z_loss"], optimizer=opt)
    assert sorted(result.by_stabilizer()) == ["qk_norm", "z_loss"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == in_opt  # the new q/k norm gains are trained too
    losses = _train(model, opt, _batches(model.head.out_features), result, steps=6)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.z_loss().item() > 0


def _proxy() -> tuple[nn.Module, torch.Tensor]:
    return create_proxy_model("tiny"), torch.randint(0, 256, (2, 16))


def _nanogpt() -> tuple[nn.Module, torch.Tensor]:
    return NanoGPT(), torch.randint(0, 50, (2, 16))


def _mha_stack() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), torch.randn(3, 5, 16)


def _objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if x.is_floating_point():  # the encoder stack: regress onto a fixed function of the input
        return F.mse_loss(out, x.flip(-1))
    return F.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())


@pytest.mark.parametrize("build", [_proxy, _nanogpt, _mha_stack], ids=["proxy", "nanogpt", "mha"])
def test_round_trip_identity_where_promised_and_training_continues(build) -> None:
    # σReparam keeps the function at conversion; QK-norm changes it (the point of it); either way the
    # converted model keeps its optimizer state and goes on learning.
    torch.manual_seed(0)
    model, x = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):  # optimizer state exists before the surgery and must survive it
        opt.zero_grad()
        _objective(model, x).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(x)
        stabilize(model, ["sigma_reparam"], optimizer=opt)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        result = stabilize(model, ["qk_norm"], optimizer=opt)
        assert result.changes and not torch.allclose(model(x), before, atol=1e-4)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters() if p.requires_grad} <= in_opt
    assert all("exp_avg" in opt.state[p] for p in opt.state)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = _objective(model, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    gains = [p for c in result.changes for p in c.new_parameters]
    assert gains and any(
        not torch.equal(p, torch.ones_like(p)) and not torch.equal(p, torch.zeros_like(p)) for p in gains
    )  # the new norm parameters are trained too
