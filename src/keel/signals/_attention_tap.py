"""The attention tap: sees every attention call of a model and reduces its logits inside the forward pass.

One tap per model, shared by the attention probes (`attn_logits`, `attn_entropy`). A forward pre-hook on
each attention module pushes a ``TorchFunctionMode`` while that module runs; the mode sees the calls that
hold the logits and reduces them on device to a few numbers per layer. No activation is kept.

- An explicit softmax over the last dimension (``softmax``/``Tensor.softmax``/``F.softmax``: keel's proxy,
  nanoGPT's slow path, Hugging Face "eager" attention): its input *is* the logits; reductions are free
  of extra matrix products.
- ``F.scaled_dot_product_attention`` (nanoGPT's flash path, Hugging Face "sdpa") and
  ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): fused kernels never materialise the
  logits, so they are rebuilt from q and k, one extra ``q @ kᵀ`` per layer. Such "fused" sites therefore
  run on their own, sparser schedule.

An attention module can spare the interception: a child module named ``logits_tap`` (an ``nn.Identity``)
applied to the masked pre-softmax logits is hooked directly — keel's proxy model does this, and so can any
model (a forward hook on a module costs one Python call, against one per torch call under the mode).

The mode is pushed only on steps a probe asked for, and only while an attention module in training mode
runs, so the steps in between cost one Python check per module. Under ``torch.compile`` the mode stays out
(pushing one while tracing would break the graph): compiled attention that only the mode would see (SDPA,
``nn.MultiheadAttention``, an explicit softmax) is not measured. A ``logits_tap`` child's hook is traced into
the graph like the model's own code, so that attention is measured, compiled or not (docs/compile.md).
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from keel.signals._hooks import ObserverHook, compiling, find_attention_modules, named_modules_by_name, observing
from keel.signals.attention_stats import attention_entropy_sums, attention_max_logit, sdpa_logits

TAP_NAME = "logits_tap"  # an attention module may expose its masked logits through a child of this name
_SOFTMAX = (torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax)
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass
class SiteStats:
    """On-device reductions of one attention module since the last collection."""

    name: str
    module: nn.Module
    fused: bool = False
    max_logit: Tensor | None = None
    entropy_sum: Tensor | None = None
    entropy_count: Tensor | None = None


@dataclass
class Request:
    """What the next forward passes should compute (set by the probes after each step)."""

    max_logit: bool = False
    entropy: bool = False
    fused: bool = False  # also rebuild logits of fused calls


@dataclass
class _Subscription:
    request: Request = field(default_factory=Request)


class AttentionTap:
    """Hooks on a model's attention modules; probes subscribe, arm it per step and collect.

    Args:
        model: The model.
        modules: Names of the attention modules; default: `find_attention_modules`.
    """

    def __init__(self, model: nn.Module, modules: list[str] | None = None) -> None:
        found = named_modules_by_name(model, modules) if modules else find_attention_modules(model)
        self.sites = [SiteStats(name=name or type(m).__name__, module=m) for name, m in found]
        self._subs: dict[int, _Subscription] = {}
        self._handles: list[Any] = []
        self._stack: list[tuple[SiteStats, TorchFunctionMode]] = []
        self._stale = False  # read by the probes: the next forward starts a new step
        self.error: Exception | None = None
        for site in self.sites:
            tap = getattr(site.module, TAP_NAME, None)
            if isinstance(tap, nn.Module):  # the model hands over its logits: no interception needed
                self._handles.append(
                    tap.register_forward_hook(ObserverHook(lambda m, a, o, s=site: self._tapped(s, o)))
                )
                continue
            pre = site.module.register_forward_pre_hook(ObserverHook(lambda m, a, s=site: self._enter(s, m)))
            post = site.module.register_forward_hook(
                ObserverHook(lambda m, a, o, s=site: self._exit(s)), always_call=True
            )
            self._handles += [pre, post]

    # --- subscriptions ----------------------------------------------------------------------------------
    def subscribe(self, owner: object) -> Request:
        return self._subs.setdefault(id(owner), _Subscription()).request

    def unsubscribe(self, owner: object) -> bool:
        """Drop a subscriber; True when none is left (the tap then removes its hooks)."""
        self._subs.pop(id(owner), None)
        if self._subs:
            return False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return True

    def _wanted(self, fused: bool = True) -> Request:
        """What the subscribers ask of this forward; ``fused=False``: leave the fused-attention requests unread."""
        want = Request()
        for sub in self._subs.values():
            r = sub.request
            want.max_logit |= r.max_logit
            want.entropy |= r.entropy
            if fused:
                want.fused |= r.fused and (r.max_logit or r.entropy)
        return want

    # --- hooks --------------------------------------------------------------------------------------------
    def _enter(self, site: SiteStats, module: nn.Module) -> None:
        if not observing(module) or self.error is not None or compiling():
            return
        if self._stale:
            self._reset()
        want = self._wanted()
        if not (want.max_logit or want.entropy):
            return
        mode = _TapMode(self, site, want)
        mode.__enter__()
        self._stack.append((site, mode))

    def _tapped(self, site: SiteStats, logits: Any) -> None:
        if not observing(site.module) or self.error is not None:
            return
        if self._stale:
            self._reset()
        # a tapped site is never fused; under torch.compile this hook is traced and whatever it reads is guarded on,
        # so reading the fused request (on every fused_every steps) recompiled the user's forward
        want = self._wanted(fused=False)
        if not (want.max_logit or want.entropy) or not isinstance(logits, Tensor):
            return
        try:
            with torch.no_grad():
                self._reduce(site, want, logits, None, 1 if logits.dim() == 4 else None, fused=False)
        except Exception as exc:  # never break the user's forward; the probe reports it at measure()
            self.error = exc

    def _exit(self, site: SiteStats) -> None:
        if self._stack and self._stack[-1][0] is site:
            _, mode = self._stack.pop()
            mode.__exit__(None, None, None)

    # --- reductions (called by the mode; the mode is off while they run) -------------------------------
    def _reduce(
        self, site: SiteStats, want: Request, logits: Tensor, probs: Tensor | None, head_dim: int | None, fused: bool
    ) -> None:
        site.fused = site.fused or fused
        if want.entropy:
            sums, counts, top = attention_entropy_sums(logits, probs, head_dim=head_dim)
            if site.entropy_sum is None or site.entropy_count is None or site.entropy_sum.shape != sums.shape:
                site.entropy_sum, site.entropy_count = sums, counts
            else:
                site.entropy_sum = site.entropy_sum + sums
                site.entropy_count = site.entropy_count + counts
        else:
            top = attention_max_logit(logits)
        site.max_logit = top if site.max_logit is None else torch.maximum(site.max_logit, top)

    def on_call(self, site: SiteStats, want: Request, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func in _SOFTMAX:
            x = args[0] if args else kwargs.get("input")
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(x, Tensor) and x.dim() >= 3 and dim is not None and dim % x.dim() == x.dim() - 1:
                self._reduce(
                    site, want, x, out if isinstance(out, Tensor) else None, 1 if x.dim() == 4 else None, fused=False
                )
        elif func is _SDPA and want.fused:
            bound = _sdpa_arguments(args, kwargs)
            logits = sdpa_logits(
                bound["query"],
                bound["key"],
                bound.get("attn_mask"),
                is_causal=bool(bound.get("is_causal", False)),
                scale=bound.get("scale"),
                enable_gqa=bool(bound.get("enable_gqa", False)),
            )
            self._reduce(site, want, logits, None, 1 if logits.dim() == 4 else None, fused=True)
        elif func is _MHA and want.fused:
            mha_logits = _mha_logits(_MHA_SIGNATURE.bind(*args, **kwargs).arguments)
            if mha_logits is not None:
                self._reduce(site, want, mha_logits, None, 1, fused=True)
        elif func is _SDPA or func is _MHA:
            site.fused = True  # seen, not measured this step

    def read(self) -> list[SiteStats]:
        """The sites measured during this step's forward passes.

        Every subscribed probe reads the same values at the same step; the next forward pass starts afresh.
        """
        self._stale = True
        return [site for site in self.sites if site.max_logit is not None]

    def _reset(self) -> None:
        for site in self.sites:
            site.max_logit = site.entropy_sum = site.entropy_count = None
        self._stale = False

    @property
    def any_fused(self) -> bool:
        return any(site.fused for site in self.sites)


class _TapMode(TorchFunctionMode):
    def __init__(self, tap: AttentionTap, site: SiteStats, want: Request) -> None:
        super().__init__()
        self.tap, self.site, self.want = tap, site, want

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tap.error is None and (func in _SOFTMAX or func is _SDPA or func is _MHA):
            try:
                with torch.no_grad():
                    self.tap.on_call(self.site, self.want, func, args, kwargs, out)
            except Exception as exc:  # never break the user's forward; the probe reports it at measure()
                self.tap.error = exc
        return out


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(_SDPA_NAMES, args, strict=False))
    bound.update(kwargs)
    return bound


def _mha_logits(a: dict[str, Any]) -> Tensor | None:
    """Rebuild ``nn.MultiheadAttention``'s logits ``(batch, heads, L, S)`` from its functional arguments."""
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None  # rare options that change the key set; not measured
    query, key = a["query"].detach(), a["key"].detach()
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    heads = int(a["num_heads"])
    E = query.size(-1)
    if a.get("use_separate_proj_weight"):
        w_q, w_k = a["q_proj_weight"], a["k_proj_weight"]
    else:
        w_q, w_k, _ = a["in_proj_weight"].chunk(3)
    b_q = b_k = None
    if a.get("in_proj_bias") is not None:
        b_q, b_k, _ = a["in_proj_bias"].chunk(3)
    q = F.linear(query, w_q.detach(), None if b_q is None else b_q.detach())  # (L, B, E)
    k = F.linear(key, w_k.detach(), None if b_k is None else b_k.detach())  # (S, B, E)
    L, B, S = q.size(0), q.size(1), k.size(0)
    q = q.reshape(L, B, heads, E // heads).permute(1, 2, 0, 3)  # (B, H, L, hd)
    k = k.reshape(S, B, heads, E // heads).permute(1, 2, 0, 3)  # (B, H, S, hd)
    logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(E // heads)  # (B, H, L, S)
    mask = a.get("attn_mask")
    if mask is not None:
        mask = mask.detach()
        mask = mask.reshape(B, heads, L, S) if mask.dim() == 3 else mask  # (B*H, L, S) or (L, S)
        logits = logits.masked_fill(mask, -math.inf) if mask.dtype == torch.bool else logits + mask.float()
    pad = a.get("key_padding_mask")
    if pad is not None:
        pad = pad.detach().reshape(B, 1, 1, S)
        logits = logits.masked_fill(pad, -math.inf) if pad.dtype == torch.bool else logits + pad.float()
    return logits


_TAPS: weakref.WeakKeyDictionary[nn.Module, AttentionTap] = weakref.WeakKeyDictionary()


def tap_for(model: nn.Module, modules: list[str] | None = None) -> AttentionTap:
    """The model's shared tap, created on first use."""
    tap = _TAPS.get(model)
    if tap is None or not tap._handles:
        tap = _TAPS[model] = AttentionTap(model, modules)
    return tap


def release(model: nn.Module, owner: object) -> None:
    tap = _TAPS.get(model)
    if tap is not None and tap.unsubscribe(owner):
        del _TAPS[model]
