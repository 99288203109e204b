"""keel.stabilize on Hugging Face GPT-2 and Llama built from tiny configs (no downloads)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel.losses import z_loss
from keel.nn import stabilize

transformers = pytest.importorskip("transformers")
from tests.tiny_hf import tiny_llama  # noqa: E402


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    return tiny_llama()


def _capture(module: torch.nn.Module, store: list) -> None:
    module.register_forward_hook(lambda m, a, out: store.append(out.detach()))


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_sigma_reparam_round_trip_and_training_continues(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 64, (2, 12))
    expected = model(ids).logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = stabilize(model, ["sigma_reparam", "z_loss"], optimizer=opt)
    assert result.by_stabilizer()["z_loss"] == ["lm_head"]
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    model.train()
    for _ in range(3):
        logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + result.z_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())
    torch.testing.assert_close(result.z_loss_hooks[0].last_log_z, torch.logsumexp(logits.detach(), -1))


def test_gpt2_fused_c_attn_gets_per_head_qk_norm() -> None:
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = torch.randint(0, 64, (2, 12))
    before = model(ids).logits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    result = stabilize(model, ["qk_norm"], optimizer=opt)
    assert result.by_stabilizer()["qk_norm"] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params + 8  # 2 layers × (q, k) × (gain, bias)
    outputs: list[torch.Tensor] = []
    _capture(model.transformer.h[0].attn.c_attn, outputs)
    after = model(ids).logits
    assert not torch.allclose(after, before)
    q, k, v = outputs[0].split(32, dim=-1)
    for part in (q, k):  # LayerNorm per head of 16 features, gain 1 and bias 0 at init
        heads = part.unflatten(-1, (2, 16))
        torch.testing.assert_close(heads.mean(-1), torch.zeros(2, 12, 2), atol=1e-5, rtol=0)
        # var/(var + eps): GPT-2's small init leaves the variance a little below 1.
        torch.testing.assert_close(heads.var(-1, unbiased=False), torch.ones(2, 12, 2), atol=5e-3, rtol=0)
    assert v.abs().max() < 10  # values untouched


def test_llama_q_and_k_projections_are_normalised_before_rope_with_gqa() -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(0, 64, (2, 10))
    result = stabilize(model, ["qk_norm", "z_loss"])
    attn = model.model.layers[0].self_attn
    assert result.by_stabilizer()["qk_norm"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    q_out, k_out = [], []
    _capture(attn.q_proj, q_out)
    _capture(attn.k_proj, k_out)
    logits = model(ids).logits
    assert q_out[0].shape[-1] == 32 and k_out[0].shape[-1] == 16  # 4 query heads, 2 key/value heads of 8
    for out in (q_out[0], k_out[0]):
        torch.testing.assert_close(
            out.unflatten(-1, (-1, 8)).mean(-1),
            torch.zeros(out.shape[:-1] + (out.shape[-1] // 8,)),
            atol=1e-5,
            rtol=0,
        )
    torch.testing.assert_close(result.z_loss(), z_loss(logits))
    model.train()
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    loss.backward()
    assert attn.q_norm.weight.grad is not None and attn.k_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_qk_norm_and_z_loss_with_the_optimizer_and_training_continues(build) -> None:
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(0, 64, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    result = stabilize(model, ["qk_norm", "z_loss"], optimizer=opt)
    norms = [p for c in result.changes if c.stabilizer == "qk_norm" for p in c.new_parameters]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert norms and all(id(p) in in_opt for p in norms)
    before = [p.detach().clone() for p in norms]
    losses = []
    for _ in range(8):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + result.z_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1
    assert all(not torch.equal(p, b) for p, b in zip(norms, before, strict=True))  # the norms learn too
