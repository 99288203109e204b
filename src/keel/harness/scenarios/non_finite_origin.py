"""A non-finite value born in one module: a hand-written softmax without max-subtraction in layer 1.

keel's tiny proxy at LR 0.1, where the second block's attention computes ``exp(z) / Σ exp(z)`` directly —
the classic hand-rolled softmax. Once a logit passes ~88.7, ``exp`` overflows float32 to Inf and
Inf/Inf gives NaN in that module; the loss and every gradient follow. keel must flag the non-finite step,
and ``non_finite_origin`` names where it was born: at seed 0 the first NaN is a gradient (step 15, one step
before the loss), born in the backward pass of ``blocks.1.attn.qkv``. The logit growth that leads there is
flagged 7 steps earlier (step 8). (The same overflow is what fp16 without care does, at
exp(11) instead of exp(88).)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from keel.harness.scenarios import SCENARIOS
from keel.harness.scenarios._common import LMScenario, ScenarioSpec
from keel.proxy.model import CausalSelfAttention, ProxyGPT
from keel.proxy.trainer import TrainConfig


class NaiveSoftmaxAttention(CausalSelfAttention):
    """`CausalSelfAttention` with softmax written as exp/sum, without subtracting the row maximum."""

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        logits = self.logits_tap((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim))  # (B, nh, T, T)
        weights = logits.exp().masked_fill(~self.causal_mask[:T, :T], 0.0)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, T, C))


def naive_second_layer(model: nn.Module) -> nn.Module:
    assert isinstance(model, ProxyGPT)
    block = model.blocks[1]
    naive = NaiveSoftmaxAttention(model.config)
    assert isinstance(block.attn, nn.Module)
    naive.load_state_dict(block.attn.state_dict())
    block.attn = naive
    return model


@SCENARIOS.register("non_finite_origin")
class NonFiniteOrigin(LMScenario):
    spec = ScenarioSpec(
        name="non_finite_origin",
        healthy=False,
        expected_kind="non_finite",
        summary="tiny proxy at LR 0.1 with a max-free softmax in blocks.1: exp overflows to NaN",
        fix="a max-subtracting softmax (F.softmax) or QK-norm",
    )

    def recipe(self, seed: int) -> TrainConfig:
        return TrainConfig(size="tiny", steps=60, lr=0.1, model_fn=naive_second_layer, seed=seed)
