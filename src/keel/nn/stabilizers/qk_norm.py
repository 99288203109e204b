"""Stabilizer ``qk_norm``: per-head QK-norm, applied structurally to the attention modules of a model.

From Dehghani et al. (2023, arXiv 2302.05442) and Wortsman et al. (2023, arXiv 2309.14322).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from keel.losses._checks import is_number
from keel.nn._surgery import (
    base_layer,
    first_parameter,
    has_bias,
    head_dim_of,
    layer_norm_bias,
    linear_features,
    raw_tensor,
    set_submodule,
)
from keel.nn.qk_norm import QK_NORM_KINDS, QKNorm
from keel.nn.qk_norm_attention import QKNormMultiheadAttention
from keel.nn.stabilizers._base import Change, stabilizers

# Separate q/k projections: Llama/Mistral/OPT/BART (q_proj), BERT (query), diffusers (to_q), Meta Llama (wq).
SEPARATE_PROJECTIONS = (("q_proj", "k_proj"), ("query", "key"), ("to_q", "to_k"), ("wq", "wk"))
# Fused projections laid out [q | k | v] along the output: nanoGPT and HF GPT-2 (c_attn), timm/keel proxy
# (qkv), MosaicML (Wqkv). GPT-NeoX's query_key_value interleaves heads and is deliberately absent.
FUSED_PROJECTIONS = ("c_attn", "qkv", "Wqkv", "qkv_proj")


class HeadNormHook:
    """Forward hook on a q or k projection: normalise its output per head of ``head_dim`` features."""

    def __init__(self, norm: QKNorm, head_dim: int) -> None:
        self.norm, self.head_dim = norm, head_dim

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.norm(output.unflatten(-1, (-1, self.head_dim))).flatten(-2)  # (..., heads·hd)


class FusedHeadNormHook:
    """Forward hook on a fused [q | k | v] projection: normalise the q and k thirds per head."""

    def __init__(self, q_norm: QKNorm, k_norm: QKNorm, head_dim: int, width: int) -> None:
        self.q_norm, self.k_norm, self.head_dim, self.width = q_norm, k_norm, head_dim, width

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        q, k, v = output.split(self.width, dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return torch.cat([q, k, v], dim=-1)


@stabilizers.register("qk_norm")
@dataclass(kw_only=True)
class QKNormStabilizer:
    """Normalise each head's queries and keys before q·kᵀ, in every attention module it recognises.

    Matched structurally, first rule wins per module:

    1. ``q_norm``/``k_norm`` attributes that are ``nn.Identity`` (keel's proxy, timm): filled with `QKNorm`
       (already real norms: left alone);
    2. ``nn.MultiheadAttention``: replaced by `QKNormMultiheadAttention` sharing its Parameters;
    3. separate projections (``q_proj``/``k_proj``, ``query``/``key``, ``to_q``/``to_k``, ``wq``/``wk``)
       with a
       known head size (Hugging Face Llama, BERT ...): a forward hook normalises each projection's output per
       head, before RoPE, where OLMo-2 and Qwen3 put their QK-norm;
    4. a fused [q|k|v] projection (``c_attn``, ``qkv``, ``Wqkv``) three times as wide as its input (nanoGPT,
       Hugging Face GPT-2): a forward hook normalises the q and k thirds per head.

    A projection wrapped by a peft adapter (LoRA) is recognised by the layer it wraps, and the hook sits on the
    wrapper, so the queries and keys it normalises include the adapter's update.

    The norms are registered as ``q_norm``/``k_norm`` on the attention module, so they are parameters and
    state-dict entries of the model. QK-norm changes the function: outputs differ from the original's.

    A LayerNorm's bias follows the model's convention: the model's own LayerNorms decide (nanoGPT built with
    ``bias=False`` has none, so its QK-norms get none); in a model without LayerNorms (Llama's RMSNorms) the
    attention's projections do.

    Attributes:
        norm: ``"layer"`` (Wortsman et al.) or ``"rms"``.
        eps: The norms' ε.
        bias: Give the LayerNorms a bias (True), none (False), or follow the model (None).
    """

    name: ClassVar[str] = "qk_norm"
    description: ClassVar[str] = "LayerNorm/RMSNorm on each head's queries and keys; bounds attention logits"
    reference: ClassVar[str] = "Dehghani et al. 2023 (arXiv 2302.05442); Wortsman et al. 2023 (arXiv 2309.14322)"
    order: ClassVar[int] = 10

    norm: str = "layer"
    eps: float = 1e-5
    bias: bool | None = None

    def __post_init__(self) -> None:
        if self.norm not in QK_NORM_KINDS:
            raise ValueError(f"QKNormStabilizer.norm={self.norm!r}; allowed: {', '.join(QK_NORM_KINDS)}")
        if not (is_number(self.eps) and self.eps > 0):
            raise ValueError(f"QKNormStabilizer.eps={self.eps!r}; allowed: a finite number > 0")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ValueError(f"QKNormStabilizer.bias={self.bias!r}; allowed: True, False or None")

    def apply(self, model: nn.Module) -> list[Change]:
        convention = layer_norm_bias(model) if self.bias is None else self.bias
        changes = []
        for name, module in list(model.named_modules()):
            change = self._apply_one(model, name, module, convention)
            if change is not None:
                changes.append(change)
        return changes

    def _norm(self, head_dim: int, like: Tensor | None, bias: bool) -> QKNorm:
        device = None if like is None else like.device
        dtype = None if like is None or not like.is_floating_point() else like.dtype
        return QKNorm(head_dim, kind=self.norm, eps=self.eps, bias=bias, device=device, dtype=dtype)

    def _apply_one(self, model: nn.Module, name: str, module: nn.Module, convention: bool | None) -> Change | None:
        """``convention``: the new norms' bias (the option or the model's LayerNorms); None: the projections'."""
        slots = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        if all(isinstance(s, nn.Module) for s in slots):
            if not all(isinstance(s, nn.Identity) for s in slots):
                return None  # already normalised
            return self._fill_slots(name, module, convention)
        if isinstance(module, nn.MultiheadAttention):
            if isinstance(module, QKNormMultiheadAttention) or module.bias_k is not None or module.add_zero_attn:
                return None
            bias = module.in_proj_bias is not None if convention is None else convention
            new = QKNormMultiheadAttention.from_module(module, norm=self.norm, eps=self.eps, norm_bias=bias)
            set_submodule(model, name, new)
            anchor = raw_tensor(module, "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight")
            return Change(
                stabilizer=self.name,
                name=name,
                old=module,
                new=new,
                anchor=anchor,
                how="replaced by QKNormMultiheadAttention (Parameters shared)",
                new_parameters=(*new.q_norm.parameters(), *new.k_norm.parameters()),
            )
        if any(hasattr(module, slot) for slot in ("q_norm", "k_norm")):
            return None  # the names are taken by something that is not a module: leave it
        for q_name, k_name in SEPARATE_PROJECTIONS:
            change = self._hook_separate(name, module, q_name, k_name, convention)
            if change is not None:
                return change
        for fused_name in FUSED_PROJECTIONS:
            change = self._hook_fused(name, module, fused_name, convention)
            if change is not None:
                return change
        return None

    def _fill_slots(self, name: str, module: nn.Module, convention: bool | None) -> Change | None:
        head_dim = head_dim_of(module)
        if head_dim is None:
            return None
        anchor = first_parameter(module)
        projection = next((c for c in module.children() if linear_features(c) is not None), None)
        bias = (projection is None or has_bias(projection)) if convention is None else convention
        module.q_norm, module.k_norm = self._norm(head_dim, anchor, bias), self._norm(head_dim, anchor, bias)
        return Change(
            stabilizer=self.name,
            name=name,
            old=module,
            new=module,
            anchor=anchor,
            how="q_norm/k_norm Identity slots filled with QKNorm",
            new_parameters=(*module.q_norm.parameters(), *module.k_norm.parameters()),
        )

    def _hook_separate(
        self, name: str, module: nn.Module, q_name: str, k_name: str, convention: bool | None
    ) -> Change | None:
        q_proj, k_proj = getattr(module, q_name, None), getattr(module, k_name, None)
        if not isinstance(q_proj, nn.Module) or not isinstance(k_proj, nn.Module):
            return None
        # a LoRA-wrapped projection is measured by the layer it wraps and hooked as itself: its output holds the update
        q_feat, k_feat = linear_features(base_layer(q_proj)), linear_features(base_layer(k_proj))
        if q_feat is None or k_feat is None:
            return None
        head_dim = head_dim_of(module, q_feat[1])
        if head_dim is None or q_feat[1] % head_dim or k_feat[1] % head_dim:
            return None
        anchor = raw_tensor(base_layer(q_proj), "weight")
        bias = has_bias(base_layer(q_proj)) if convention is None else convention
        module.q_norm, module.k_norm = self._norm(head_dim, anchor, bias), self._norm(head_dim, anchor, bias)
        handles = (
            q_proj.register_forward_hook(HeadNormHook(module.q_norm, head_dim)),
            k_proj.register_forward_hook(HeadNormHook(module.k_norm, head_dim)),
        )
        return Change(
            stabilizer=self.name,
            name=name,
            old=module,
            new=module,
            anchor=anchor,
            handles=handles,
            how=f"outputs of {q_name}/{k_name} normalised per head (forward hooks)",
            new_parameters=(*module.q_norm.parameters(), *module.k_norm.parameters()),
        )

    def _hook_fused(self, name: str, module: nn.Module, fused_name: str, convention: bool | None) -> Change | None:
        proj = getattr(module, fused_name, None)
        if not isinstance(proj, nn.Module):
            return None
        features = linear_features(base_layer(proj))  # a LoRA-wrapped projection: the layer it wraps
        if features is None or features[1] != 3 * features[0] or getattr(module, "is_cross_attention", False):
            return None
        width = features[0]
        head_dim = head_dim_of(module, width)
        if head_dim is None or width % head_dim:
            return None
        anchor = raw_tensor(base_layer(proj), "weight")
        bias = has_bias(base_layer(proj)) if convention is None else convention
        module.q_norm, module.k_norm = self._norm(head_dim, anchor, bias), self._norm(head_dim, anchor, bias)
        handle = proj.register_forward_hook(FusedHeadNormHook(module.q_norm, module.k_norm, head_dim, width))
        return Change(
            stabilizer=self.name,
            name=name,
            old=module,
            new=module,
            anchor=anchor,
            handles=(handle,),
            how=f"q and k thirds of {fused_name} normalised per head (forward hook)",
            new_parameters=(*module.q_norm.parameters(), *module.k_norm.parameters()),
        )
