"""The proxy's mixture-of-experts FFN: a softmax top-k token-choice router, capacity, and the two router losses.

Each MoE block replaces the dense MLP of a proxy block with ``num_experts`` copies of it and a router, as the
Switch Transformer (Fedus et al. 2021, arXiv 2101.03961) and GShard do. Laid out like Hugging Face's Mixtral so
that one probe reads both: the block's ``mlp`` is a `MoeMLP` whose ``gate`` is a `MoeRouter` with a bare
``weight`` (E, d) that returns ``(router_logits, top_k_weights, top_k_indices)``.

Conventions (see reference/domain-anchors.md §1): the router runs in float32; the load-balancing loss is Switch's
``E · Σ_i f_i · P_i`` normalised so that perfect balance gives 1 and routing collapsed onto k experts gives E/k
(Megatron and OLMo-core; Hugging Face's value is k times this); the router z-loss is ST-MoE's
``mean_tokens(logsumexp(logits))²`` (Zoph et al. 2022, arXiv 2202.08906). The losses are kept as terms for the
loop to add (`moe_loss`), not injected into the gradient behind its back, so the loss a loop reports stays what
it optimises (the same choice as `keel.nn.ZLossHook`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.validate import check_types, require_ints
from keel.losses.router import LOAD_BALANCING_COEFFICIENT, load_balancing_loss, router_z_loss, tokens_per_expert

# Router init N(0, 0.02), as Hugging Face's Mixtral initialises its gate (initializer_range).
ROUTER_INIT_STD = 0.02


@dataclass(kw_only=True)
class MoeConfig:
    """How a proxy's MoE blocks route.

    Attributes:
        num_experts: Experts per MoE block, each a copy of the proxy's dense MLP.
        top_k: Experts per token: 1 (Switch) or 2 (GShard, Mixtral).
        capacity_factor: Expert capacity ``ceil(tokens · k / E · capacity_factor)`` per forward; assignments past
            it are dropped (the token's residual passes through). None is dropless.
        aux_loss: Coefficient of the Switch load-balancing loss (1e-2); 0 turns it off.
        router_z_loss: Coefficient of the ST-MoE router z-loss (1e-3 in ST-MoE); 0 turns it off.
    """

    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float | None = None
    aux_loss: float = LOAD_BALANCING_COEFFICIENT
    router_z_loss: float = 0.0

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "num_experts", minimum=2)
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            raise ValueError(f"MoeConfig.top_k={self.top_k!r}; allowed: 1 or 2 (at most num_experts)")
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
            raise ValueError(
                f"MoeConfig.capacity_factor={self.capacity_factor!r}; allowed: None (dropless) or a finite number > 0"
            )
        for name in ("aux_loss", "router_z_loss"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"MoeConfig.{name}={value!r}; allowed: a finite coefficient >= 0 (0 is off)")


@dataclass
class RoutingStats:
    """What one forward of a `MoeMLP` routed, detached and on the model's device (reading them does not sync).

    Attributes:
        tokens_per_expert: ``(E,)`` float32 token assignments each expert was chosen for, before capacity drops
            (sums to tokens · k).
        dropped: 0-d fraction of the assignments dropped by capacity (0 when dropless).
        aux_loss: 0-d Switch load-balancing loss, unscaled (1 balanced, E/k collapsed).
        router_z: 0-d router z-loss, unscaled: mean over tokens of logsumexp(router logits)².
    """

    tokens_per_expert: Tensor
    dropped: Tensor
    aux_loss: Tensor
    router_z: Tensor


class MoeRouter(nn.Module):
    """Softmax top-k router in float32: ``weight`` is (E, d) like Hugging Face's Mixtral ``gate``.

    ``forward(x)`` on ``(tokens, d)`` returns ``(logits, weights, indices)``: the raw router logits ``(tokens, E)``
    in float32, the routing weights ``(tokens, k)`` and the chosen experts ``(tokens, k)``, best first. With k = 1
    the weight is the chosen expert's probability (Switch; renormalising it to 1 would leave the router without a
    gradient); with k = 2 the two probabilities are renormalised to sum to 1 (GShard, Mixtral).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=ROUTER_INIT_STD)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices


class MoeMLP(nn.Module):
    """A mixture-of-experts FFN on ``(..., d)``: routes each token to its top-k experts and sums their outputs.

    After every forward, ``stats`` holds the step's `RoutingStats` and ``loss`` the weighted aux + z-loss term of
    that forward (with its graph; None when both coefficients are 0), which `moe_loss` collects for the loop.

    Args:
        d_model: Token width.
        config: Routing settings.
        expert: Builds one expert (the proxy's dense MLP).

    Example:
        >>> moe = MoeMLP(8, MoeConfig(num_experts=4, top_k=1), expert=lambda: nn.Linear(8, 8))
        >>> moe(torch.randn(2, 3, 8)).shape, moe.stats.tokens_per_expert.sum().item()
        (torch.Size([2, 3, 8]), 6.0)
    """

    def __init__(self, d_model: int, config: MoeConfig, *, expert: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.gate = MoeRouter(d_model, config.num_experts, config.top_k)
        self.experts = nn.ModuleList(expert() for _ in range(config.num_experts))
        self.stats: RoutingStats | None = None
        self.loss: Tensor | None = None

    @property
    def capacity_factor(self) -> float | None:
        """The config's capacity factor, where keel's router probe (and Megatron-style code) looks for it."""
        return self.config.capacity_factor

    def capacity(self, tokens: int) -> int | None:
        """Assignments one expert takes in a forward of ``tokens`` tokens (Megatron's ceil(T·k/E·cf))."""
        cf = self.config.capacity_factor
        return None if cf is None else math.ceil(tokens * self.config.top_k / self.config.num_experts * cf)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, indices = self.gate(x)
        # k from the router's output, not the config: keel's dense_to_sparse gate routes to all E, then to 1
        num_tokens, num_experts, k = x.shape[0], self.config.num_experts, indices.shape[-1]
        # choice-major order: every token's first choice queues before any second choice (Switch, GShard)
        expert_of = indices.t().reshape(-1)
        token_of = torch.arange(num_tokens, device=x.device).repeat(k)
        weight_of = weights.t().reshape(-1)
        counts = tokens_per_expert(indices, num_experts)
        capacity = self.capacity(num_tokens)
        dropped = torch.zeros((), device=x.device)
        if capacity is not None:
            one_hot = F.one_hot(expert_of, num_experts)
            position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
            keep = position < capacity
            dropped = 1 - keep.float().mean()
            expert_of = torch.where(keep, expert_of, num_experts)  # "expert E" = dropped: no expert runs it
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = (expert_of == e).nonzero().squeeze(-1)
            tokens = token_of[chosen]
            y = expert(x[tokens]) * weight_of[chosen].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, tokens, y)
        self._record(logits, indices, counts, dropped)
        return out.reshape(shape)

    def _record(self, logits: Tensor, indices: Tensor, counts: Tensor, dropped: Tensor) -> None:
        aux = load_balancing_loss(logits, indices, coefficient=1.0)
        z = router_z_loss(logits, coefficient=1.0)
        self.stats = RoutingStats(
            tokens_per_expert=counts.detach(), dropped=dropped.detach(), aux_loss=aux.detach(), router_z=z.detach()
        )
        terms = [c * t for c, t in ((self.config.aux_loss, aux), (self.config.router_z_loss, z)) if c > 0]
        self.loss = sum(terms[1:], terms[0]) if terms else None


def moe_loss(model: nn.Module) -> Tensor | None:
    """The sum of every `MoeMLP`'s weighted aux + z-loss term from the model's latest forward; None without any.

    Add it to the task loss before ``backward()``; the proxy trainer does.
    """
    terms = [m.loss for m in model.modules() if isinstance(m, MoeMLP) and m.loss is not None]
    return sum(terms[1:], terms[0]) if terms else None
