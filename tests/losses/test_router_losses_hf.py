"""keel.stabilize's router losses on Hugging Face Switch Transformers and NLLB-MoE (tiny configs, no weights).

Their routers keep the logits in a ``classifier`` child of a weightless ``router`` and return a dispatch mask first;
the router losses find those classifiers (the rule the router probe uses, `classifier_routers`). Each hook's value
must equal an independent float64 re-derivation on the HF module's real output — ST-MoE's z-loss, mean over tokens
of logsumexp(logits)²; Switch's load balancing, E · Σ_i f_i · P_i with f_i from the router's own dispatch — and the
gradient it injects must be that of ``loss + c·aux`` computed by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import keel
from keel.nn.router_aux_loss import router_loss_hooks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("switch", "nllb_moe", "nllb_moe_sampling")
COEFFICIENTS = {"router_z_loss": 1e-3, "load_balancing": 1e-2}


def _model(family: str) -> torch.nn.Module:
    if family == "switch":
        config = transformers.SwitchTransformersConfig(
            vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            num_experts=4, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, router_jitter_noise=0.0,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.SwitchTransformersForConditionalGeneration(config)
    config = transformers.NllbMoeConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, expert_capacity=64,
        encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=64, encoder_layerdrop=0.0,
        decoder_layerdrop=0.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        second_expert_policy="sampling" if family.endswith("sampling") else "all",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.NllbMoeForConditionalGeneration(config)


def _routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(".router")}


def _capture(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each router's raw logits (its classifier's output) and the dispatch it made (token × expert, 0/1)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for name, router in _routers(model).items():

        def logits_hook(module, args, out, name=name):
            seen.setdefault(name, {})["logits"] = out.detach().double().clone()

        def dispatch_hook(module, args, out, name=name):
            mask, weights, _ = out  # Switch: one-hot (B, S, E) after capacity; NLLB: top-1 mask, (T, E) weights
            dispatched = mask if weights.shape[-1] == 1 else (weights > 0)
            seen[name]["dispatched"] = dispatched.reshape(-1, dispatched.shape[-1]).double()

        router.classifier.register_forward_hook(logits_hook, prepend=True)  # before the stabilizer's hook
        router.register_forward_hook(dispatch_hook)
    return seen


def _z_loss(logits: np.ndarray) -> float:
    x = logits.reshape(-1, logits.shape[-1])
    top = x.max(axis=-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    return float(np.mean(lse**2))


def _load_balancing(logits: np.ndarray, dispatched: np.ndarray) -> float:
    x = logits.reshape(-1, logits.shape[-1])
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    f = dispatched.sum(axis=0) / dispatched.sum()  # share of the T·k assignments
    return float(x.shape[-1] * np.sum(f * probs.mean(axis=0)))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", FAMILIES)
def test_router_losses_match_each_router_of_the_hf_model_and_equal_a_float64_rederivation(family):
    model = _model(family)
    seen = _capture(model)
    result = keel.stabilize(model, list(COEFFICIENTS))
    assert result.unmatched == []
    names = sorted(f"{n}.classifier" for n in _routers(model))
    assert len(names) == 4  # 2 encoder + 2 decoder MoE layers
    assert sorted(c.name for c in result.changes if c.stabilizer == "router_z_loss") == names
    model.train()
    model(**_batch()).loss.backward()
    hooks = {(h.kind, n): h for n, m in model.named_modules() for h in router_loss_hooks(m) if n in names}
    for router, values in seen.items():
        logits, dispatched = values["logits"].numpy(), values["dispatched"].numpy()
        assert dispatched.sum() == dispatched.shape[0] * (1 if family == "switch" else 2)  # nothing dropped
        z = hooks[("router_z_loss", f"{router}.classifier")].last
        lb = hooks[("load_balancing", f"{router}.classifier")].last
        assert z.item() == pytest.approx(_z_loss(logits), rel=1e-5)
        if family != "nllb_moe_sampling":  # its 2nd expert is drawn with Gumbel noise: keel counts the top 2
            assert lb.item() == pytest.approx(_load_balancing(logits, dispatched), rel=1e-5)
        top_k = torch.from_numpy(logits).reshape(-1, logits.shape[-1]).topk(2 if "nllb" in family else 1).indices
        top_k_dispatch = torch.zeros(dispatched.shape, dtype=torch.float64).scatter_(1, top_k, 1.0).numpy()
        assert lb.item() == pytest.approx(_load_balancing(logits, top_k_dispatch), rel=1e-5)


@pytest.mark.parametrize("family", ["switch", "nllb_moe"])
def test_the_injected_gradient_is_that_of_the_loss_plus_the_weighted_router_losses(family):
    batch = _batch()
    stabilized = _model(family).eval()  # eval: no jitter, no dropout; the hooks inject with grad enabled
    keel.stabilize(stabilized, list(COEFFICIENTS))
    stabilized(**batch).loss.backward()

    plain = _model(family).eval()
    logits: list[torch.Tensor] = []
    for router in _routers(plain).values():
        router.classifier.register_forward_hook(lambda module, args, out: logits.append(out))
    total = plain(**batch).loss
    k = 2 if family == "nllb_moe" else 1
    for x in logits:
        x = x.reshape(-1, x.shape[-1]).double()
        chosen = torch.zeros_like(x).scatter_(1, x.detach().topk(k).indices, 1.0)
        f = chosen.sum(0) / chosen.sum()
        total = total + COEFFICIENTS["router_z_loss"] * torch.logsumexp(x, -1).square().mean()
        total = total + COEFFICIENTS["load_balancing"] * x.shape[-1] * (f * x.softmax(-1).mean(0)).sum()
    total.backward()
    for (name, a), b in zip(stabilized.named_parameters(), plain.parameters(), strict=True):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad.to(a.grad.dtype), rtol=1e-4, atol=1e-7, msg=name)
