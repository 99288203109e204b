"""Router probe: how a mixture-of-experts router scores and spreads its tokens, per MoE layer.

| key                        | cadence             | cost (per router call, on the (T, E) logits it already made)     |
|----------------------------|---------------------|-------------------------------------------------------------------|
| `moe/router_max_logit`     | every `every` steps | one fp32 cast, one max                                            |
| `moe/router_z`             | as above            | one logsumexp                                                     |
| `moe/gate_entropy`         | as above            | exp(x − logsumexp), the z's logsumexp reused; one `entr` sum      |
| `moe/load_imbalance`       | as above            | one `index_add_` of the top-k indices into E counters             |
| `moe/load_cv`              | as above            | free (from the counters, once per step)                           |
| `moe/dead_experts`         | as above            | free                                                              |
| `moe/dropped`              | as above            | free (capacity from the counters; 0 when dropless)               |
| `moe/aux_loss`             | as above            | one sum of the softmax over tokens (E values)                     |
| `moe/experts`, `moe/top_k` | as above            | free: E (largest) and k (smallest) over routers; collapse = E/k   |
| `moe/<signal>/<router>`    | stored on `log_every` steps | one float per router and signal (all but aux loss)        |

T is the number of tokens the router saw in the step (micro-batches of one step add up) and E its number of
experts; every reduction runs on the device in float32 inside the router's forward hook and keeps no activation.
A model without a router gets no hook and costs nothing. Once per router, at its first measured step, 8 rows of its
output are read on the host: rows that are non-negative and sum to 1 are probabilities, not logits
(huggingface/transformers#45120), and the probe warns (`RouterProbabilitiesWarning`).

Definitions (per router, over the step's T tokens; c_i = tokens routed to expert i, each token counted once per
chosen expert, so Σc = T·k):

- max logit: the largest raw router logit (signed, NaN-propagating).
- z: mean_t (logsumexp_j x_tj)², the ST-MoE router z-loss without its coefficient (as Megatron and OLMo-core
  log it "unscaled").
- gate entropy: mean_t H(softmax(x_t)) ÷ log E: 1 for a uniform router, 0 for a one-hot one.
- imbalance: max_i c_i / mean_i c_i (OLMo-core's "load imbalance"): 1 balanced, E/k when every token goes to the
  same k experts. CV: std_i c_i / mean_i c_i (population std). Dead experts: experts with c_i = 0.
- dropped: Σ_i max(c_i − C, 0) / (T·k) with the capacity C = ceil(T·k/E · capacity_factor) of each forward
  call (Megatron's ``apply_router_token_dropping``), when the router or its MoE block has a ``capacity_factor``;
  0 when it has none (dropless, as every Hugging Face MoE).
- aux loss: the Switch load-balancing loss E·Σ_i f_i·P_i with f_i = c_i/(T·k) and P_i the mean router probability
  of expert i; balanced = 1 (Megatron's and OLMo-core's normalisation; Hugging Face's
  ``load_balancing_loss_func`` gives k at balance: divide it by k). ``moe/aux_loss`` is the mean over routers, as
  Megatron reports it (Hugging Face pools all layers' tokens into one product instead).

Routers are found by layout: a module named ``gate`` or ``router`` with a 2-D ``weight`` (E, d) whose parent has an
``experts`` child — Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE ``mlp.gate`` (a ``*TopKRouter`` returning
``(raw logits, top-k weights, top-k indices)``), Mixtral 4.x's ``block_sparse_moe.gate`` (an ``nn.Linear``
returning the logits), keel's proxy MoE router — and the ``classifier`` of a weightless ``router`` beside ``experts``
(Switch Transformers, NLLB-MoE: `classifier_routers`). Qwen2-MoE's ``shared_expert_gate`` (E = 1) is not a router. Name
any other module with ``modules=[...]``: its output (or its output's first element) must be the raw logits
``(..., E)``; a third element of integer dtype is taken as the chosen experts, otherwise the top k of the logits
(k from the config's ``top_k``, else a ``top_k`` / ``num_experts_per_tok`` attribute of the module or its parent).

References:
    Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961 (the load-balancing loss);
    Zoph et al. 2022, "ST-MoE", arXiv 2202.08906 (router z-loss);
    Megatron-LM ``megatron/core/transformer/moe/moe_utils.py``; OLMo-core ``src/olmo_core/nn/moe/router.py``;
    transformers ``models/mixtral/modeling_mixtral.py`` (``MixtralTopKRouter``, ``load_balancing_loss_func``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from keel._core import keys
from keel._core.errors import KeelWarning
from keel._core.validate import check_types, config_from
from keel.losses._router_layout import (
    declared_top_k,
    parent_module,
    routers_with_classifiers,
    split_router_output,
)
from keel.signals._hooks import ObserverHook, compiling, named_modules_by_name, observing
from keel.signals.attn_logits import due
from keel.signals.logit_stats import log_partition
from keel.signals.probe import Measurements, PerParam, StepContext
from keel.signals.registry import PROBES


class RouterProbabilitiesWarning(KeelWarning):
    """A router's first output looks like probabilities, not raw logits; its logit signals mean nothing."""


class NoRouterTopKWarning(KeelWarning):
    """A router's top-k is unknown; the probe assumes 1 (pass ``top_k=``)."""


def _warn_unknown_top_k(sites: list[RouterSite]) -> None:
    unknown = [s.name for s in sites if s.top_k is None]
    if unknown:
        warnings.warn(
            f"router: top_k of {unknown} unknown (no top_k / num_experts_per_tok attribute); counted as 1 where the "
            "output carries no chosen experts; pass top_k=...",
            NoRouterTopKWarning,
            stacklevel=3,
        )


@dataclass(kw_only=True)
class RouterProbeConfig:
    """Settings of the router probe.

    Attributes:
        every: Cadence in steps.
        modules: Names of the router modules to watch; ``None`` finds them by layout (see the module docstring).
        top_k: Experts per token, for routers whose output does not carry the chosen experts; ``None`` reads the
            module's (or its MoE block's) ``top_k`` / ``num_experts_per_tok``, else 1.
    """

    every: int = 1
    modules: list[str] | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.every < 1:
            raise ValueError(f"RouterProbeConfig.every={self.every!r}; allowed: an int >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"RouterProbeConfig.top_k={self.top_k!r}; allowed: an int >= 1 or None")


@dataclass
class RouterSite:
    """One router: its name, module, MoE block (its parent, or None) and what the step accumulated.

    ``sums`` holds, on device: [max logit, Σ lse², Σ entropy/log E, T, dropped assignments]; ``counts`` the
    (E,) tokens per expert; ``probs`` the (E,) router probabilities summed over tokens.
    """

    name: str
    module: nn.Module
    block: nn.Module | None
    top_k: int | None
    sums: Tensor | None = None
    counts: Tensor | None = None
    probs: Tensor | None = None
    sample: Tensor | None = None  # the first call's first rows, for the one-time probabilities check
    checked: bool = False


def find_routers(model: nn.Module, names: list[str] | None = None, top_k: int | None = None) -> list[RouterSite]:
    """The routers of ``model``: the named modules, or those found by layout (`routers_with_classifiers`), in
    registration order.

    Example:
        >>> find_routers(nn.Linear(2, 2))
        []
    """
    table = dict(model.named_modules())
    found: list[tuple[str, nn.Module, int | None]]
    if names is not None:
        found = [(n, m, None) for n, m in named_modules_by_name(model, names)]
    else:
        found = routers_with_classifiers(model)
    sites = []
    for name, module, layout_top_k in found:
        block = parent_module(table, name)
        k = top_k or layout_top_k or declared_top_k(module, block)
        sites.append(RouterSite(name=name, module=module, block=block, top_k=k))
    return sites


def router_sums(
    logits: Tensor, chosen: Tensor | None = None, *, top_k: int = 1, capacity_factor: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One router call's additive statistics, float32 on the logits' device (`router_signals` finishes them).

    Args:
        logits: ``(..., E)`` raw router logits.
        chosen: ``(..., k)`` integer indices of the chosen experts; ``None``: the top ``top_k`` of the logits.
        top_k: k when ``chosen`` is None.
        capacity_factor: Expert capacity = ceil(T·k/E · factor); ``None``: dropless.

    Returns:
        ``sums`` = [max logit, Σ_t lse², Σ_t H_t / log E, T, dropped assignments], ``counts`` (E,) and
        ``probs`` (E,), the router probabilities summed over tokens.
    """
    x = logits.detach().reshape(-1, logits.shape[-1]).float()
    n_tokens, n_experts = x.shape
    if chosen is None:
        chosen = x.topk(min(top_k, n_experts), dim=-1).indices
    k = chosen.numel() // n_tokens if n_tokens else max(top_k, 1)
    chosen = chosen.detach().reshape(n_tokens, k)
    counts = torch.zeros(n_experts, dtype=torch.float32, device=x.device)
    counts.index_add_(0, chosen.flatten().long(), torch.ones(chosen.numel(), dtype=torch.float32, device=x.device))
    lse = log_partition(x)
    probs = (x - lse.unsqueeze(-1)).exp()  # the softmax from the log-partition the z-loss needs anyway
    entropy = torch.special.entr(probs).sum(-1)  # entr(0) = 0: a probability that underflowed adds nothing
    top = x.amax() if n_tokens else torch.full((), -math.inf, device=x.device)
    if capacity_factor is None or capacity_factor <= 0 or not n_tokens:
        dropped = torch.zeros((), device=x.device)
    else:
        capacity = math.ceil(n_tokens * k / n_experts * capacity_factor)
        dropped = (counts - capacity).clamp_min(0).sum()
    sums = torch.stack(
        [
            top,
            lse.square().sum(),
            entropy.sum() / math.log(n_experts) if n_experts > 1 else torch.zeros((), device=x.device),
            torch.full((), float(n_tokens), device=x.device),
            dropped,
        ]
    )
    return sums, counts, probs.sum(0)


def router_signals(sums: Tensor, counts: Tensor, probs: Tensor) -> dict[str, Tensor]:
    """The per-router signals from a step's accumulated `router_sums` (float32 tensors, on device).

    ``sums`` (..., 5), ``counts`` and ``probs`` (..., E): one router, or several stacked along leading dimensions (the
    probe reads all its routers in one pass), each signal then of the leading shape.

    Keys: ``max_logit``, ``z``, ``entropy``, ``imbalance``, ``cv``, ``dead``, ``dropped``, ``aux``, ``experts`` (E)
    and ``top_k`` (k). No tokens give NaN for every ratio (nothing measured is not balanced).

    Example:
        >>> s = router_signals(*router_sums(torch.zeros(4, 2), top_k=1))
        >>> round(s["entropy"].item(), 4), round(s["aux"].item(), 4), s["dead"].item()
        (1.0, 1.0, 1.0)
    """
    top, z_sum, h_sum, n_tokens, dropped = sums.unbind(-1)
    n_experts = counts.shape[-1]
    assignments = counts.sum(-1)
    mean = assignments / n_experts
    f = counts / assignments.unsqueeze(-1)  # f_i = c_i / (T·k)
    p = probs / n_tokens.unsqueeze(-1)  # P_i
    return {
        "max_logit": top,
        "z": z_sum / n_tokens,
        "entropy": h_sum / n_tokens,
        "imbalance": counts.amax(-1) / mean,
        "cv": counts.std(-1, correction=0) / mean,
        "dead": (counts == 0).sum(-1).float(),
        "dropped": dropped / assignments,
        "aux": n_experts * (f * p).sum(-1),
        "experts": torch.full_like(top, float(n_experts)),
        "top_k": assignments / n_tokens,  # k: every token is counted once per chosen expert
    }


def _signals_by_router(seen: list[RouterSite]) -> dict[str, Tensor]:
    """Each signal as a (routers,) tensor: one `router_signals` pass over the stacked sums when the routers have
    the same number of experts, else one per router."""
    if len({s.counts.shape for s in seen}) == 1:  # type: ignore[union-attr]
        stacked = (torch.stack([getattr(s, a) for s in seen]) for a in ("sums", "counts", "probs"))
        return router_signals(*stacked)
    per_site = [router_signals(s.sums, s.counts, s.probs) for s in seen]  # type: ignore[arg-type]
    return {signal: torch.stack([d[signal] for d in per_site]) for signal in per_site[0]}


# per-router signal → (per-layer family, extreme key, how the extreme is taken over routers)
_FAMILIES: dict[str, tuple[str | None, str, str]] = {
    "max_logit": (keys.MOE_ROUTER_MAX_LOGIT_PER_LAYER, keys.MOE_ROUTER_MAX_LOGIT, "max"),
    "z": (keys.MOE_ROUTER_Z_PER_LAYER, keys.MOE_ROUTER_Z, "max"),
    "entropy": (keys.MOE_GATE_ENTROPY_PER_LAYER, keys.MOE_GATE_ENTROPY, "min"),
    "imbalance": (keys.MOE_LOAD_IMBALANCE_PER_LAYER, keys.MOE_LOAD_IMBALANCE, "max"),
    "cv": (keys.MOE_LOAD_CV_PER_LAYER, keys.MOE_LOAD_CV, "max"),
    "dead": (keys.MOE_DEAD_EXPERTS_PER_LAYER, keys.MOE_DEAD_EXPERTS, "sum"),
    "dropped": (keys.MOE_DROPPED_PER_LAYER, keys.MOE_DROPPED, "max"),
    "aux": (None, keys.MOE_AUX_LOSS, "mean"),
    "experts": (None, keys.MOE_EXPERTS, "max"),  # E and k: a collapsed router's imbalance is E/k (load_collapse)
    "top_k": (None, keys.MOE_TOP_K, "min"),
}


def _reduce(values: Tensor, how: str) -> Tensor:
    if how == "max":
        return values.amax()  # amax/amin propagate NaN: a non-finite router shows
    if how == "min":
        return values.amin()
    return values.sum() if how == "sum" else values.mean()


@PROBES.register("router")
class RouterProbe:
    """Emits router max logit, z-loss, gate entropy, expert load, drops and aux loss per MoE layer and as extremes.

    Example:
        >>> probe = RouterProbe()
        >>> probe.attach(nn.Linear(2, 2))
        >>> probe.sites
        []
    """

    name = "router"

    def __init__(self, config: RouterProbeConfig | None = None, **fields: object) -> None:
        self.config = config_from(self, RouterProbeConfig, config, fields)
        self.sites: list[RouterSite] = []
        self._handles: list[Any] = []
        self._armed = False
        self._error: Exception | None = None

    def attach(self, model: nn.Module) -> None:
        self.sites = find_routers(model, self.config.modules, self.config.top_k)
        _warn_unknown_top_k(self.sites)
        self._handles = [
            site.module.register_forward_hook(ObserverHook(lambda mod, a, out, s=site: self._hook(s, mod, out)))
            for site in self.sites
        ]
        self._armed = due(0, self.config.every)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, site: RouterSite, module: nn.Module, output: Any) -> None:
        if not (self._armed and observing(module)):
            return
        try:  # a hook runs inside the user's forward: never break it; `read` reports the error
            logits, _, chosen = split_router_output(output)
            if not logits.is_floating_point():
                raise TypeError(
                    f"{site.name} returns a {logits.dtype} integer tensor first (a dispatch mask?), not the raw "
                    "logits; allowed: a module whose output, or its first element, is the logits (a Switch / NLLB-MoE "
                    "router's `classifier`)"
                )
            if not site.checked and site.sample is None and not compiling():
                site.sample = logits.detach().reshape(-1, logits.shape[-1])[:8].float().clone()
            capacity = getattr(module, "capacity_factor", None)
            if capacity is None:
                capacity = getattr(site.block, "capacity_factor", None)
            with torch.no_grad():
                sums, counts, probs = router_sums(
                    logits,
                    chosen,
                    top_k=site.top_k or 1,
                    capacity_factor=float(capacity) if isinstance(capacity, int | float) else None,
                )
                if site.sums is None or site.counts is None or site.probs is None or site.counts.shape != counts.shape:
                    site.sums, site.counts, site.probs = sums, counts, probs
                else:  # another micro-batch of the same step: add up, except the max
                    site.sums = torch.cat([torch.maximum(site.sums[:1], sums[:1]), site.sums[1:] + sums[1:]])
                    site.counts, site.probs = site.counts + counts, site.probs + probs
        except Exception as exc:
            self._error = exc

    def read(self) -> Measurements:
        """This step's values (what `measure` returns), then starts a new step."""
        seen = [s for s in self.sites if s.sums is not None]
        self._check_probabilities()
        by_router = _signals_by_router(seen) if seen else {}
        for s in self.sites:
            s.sums = s.counts = s.probs = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"router hook failed: {error!r}") from error
        if not by_router:
            return {}
        names = tuple(s.name for s in seen)
        out: Measurements = {}
        for signal, (family, key, how) in _FAMILIES.items():
            values = by_router[signal]
            out[key] = _reduce(values, how)
            if family is not None:
                out[family] = PerParam(names, values)
        return out

    def _check_probabilities(self) -> None:
        """Warn once per router whose output rows are non-negative and sum to 1 (huggingface/transformers#45120:
        some families return probabilities where Mixtral returns logits). One host read per router, once."""
        for s in self.sites:
            if s.sample is None or s.checked:
                continue
            rows, s.sample, s.checked = s.sample, None, True
            if rows.device.type == "meta" or not rows.numel():
                continue
            if bool(((rows >= 0).all() & ((rows.sum(-1) - 1).abs() < 1e-3).all()).item()):
                warnings.warn(
                    f"router: {s.name} returns probabilities, not raw logits (huggingface/transformers#45120): its "
                    "max logit, z, entropy and aux loss mean nothing; name the module that makes the logits",
                    RouterProbabilitiesWarning,
                    stacklevel=3,
                )

    def measure(self, ctx: StepContext) -> Measurements:
        out = self.read()
        self._armed = due(ctx.step + 1, self.config.every)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}
