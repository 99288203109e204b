"""Private helpers for model surgery: structural facts about modules, and replacing submodules."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize

# Attribute names under which attention modules of common codebases keep their head count / head size.
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "nhead", "heads")
HEAD_DIM_ATTRS = ("head_dim", "head_size", "d_head", "attention_head_size", "dim_head")


def parametrization_chain(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    """The parametrizations registered on ``module.<name>`` (holding the ``original``), or None if there are none."""
    if not parametrize.is_parametrized(module, name):
        return None
    chain = module.get_submodule(f"parametrizations.{name}")
    return chain if isinstance(chain, parametrize.ParametrizationList) else None


def raw_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` as stored: the original Parameter when it is parametrized (reading the attribute
    would run the parametrization, e.g. a σReparam power-iteration step)."""
    chain = parametrization_chain(module, name)
    value = chain.original if chain is not None else getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def base_layer(module: nn.Module) -> nn.Module:
    """The layer an adapter wrapper adapts (peft's LoRA and its kin wrap a projection and expose it as
    ``get_base_layer()``), or ``module`` itself: its shape, weight and bias are the projection's."""
    get = getattr(module, "get_base_layer", None)
    base = get() if callable(get) else module
    return base if isinstance(base, nn.Module) else module


def adapter_factors(model: nn.Module) -> set[int]:
    """ids of the modules inside peft adapter containers (``lora_A``, ``lora_B``, ... of a tuner layer): factors of
    a low-rank update, not weights of the model."""
    ids: set[int] = set()
    for module in model.modules():
        for name in getattr(module, "adapter_layer_names", ()):
            container = getattr(module, name, None)
            if isinstance(container, nn.Module):
                ids.update(id(m) for m in container.modules())
    return ids


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module that applies a dense projection by ``.weight``: ``nn.Linear`` (weight out×in)
    or a Hugging Face-style ``Conv1D`` (attribute ``nf``, weight in×out). None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = raw_tensor(module, "weight")
    nf = getattr(module, "nf", None)
    if isinstance(nf, int) and weight is not None and weight.dim() == 2 and weight.shape[1] == nf:
        return int(weight.shape[0]), nf
    return None


def int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def head_dim_of(module: nn.Module, width: int | None = None) -> int | None:
    """The attention head size: an explicit attribute, else ``width / head count``."""
    explicit = int_attr(module, HEAD_DIM_ATTRS)
    if explicit is not None:
        return explicit
    heads = int_attr(module, HEAD_COUNT_ATTRS)
    if heads is not None and width is not None and width % heads == 0:
        return width // heads
    return None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def first_parameter(module: nn.Module) -> nn.Parameter | None:
    return next(module.parameters(), None)


def shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of Parameters reachable under more than one name (tied weights, e.g. lm_head ↔ embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def has_bias(module: nn.Module | None) -> bool:
    """Whether ``module`` holds a bias tensor (``nn.Linear(..., bias=False)`` and HF Llama's projections do not)."""
    return isinstance(getattr(module, "bias", None), Tensor)


def layer_norm_bias(model: nn.Module) -> bool | None:
    """Whether the model's LayerNorms learn a bias; None when it has no affine LayerNorm to tell.

    Any module whose class name says LayerNorm counts (``nn.LayerNorm``, nanoGPT's own ``LayerNorm`` with its
    ``bias`` flag, T5's bias-free one); RMSNorms have no bias by definition and so tell nothing.
    """
    norms = [m for m in model.modules() if "LayerNorm" in type(m).__name__ and raw_tensor(m, "weight") is not None]
    if not norms:
        return None
    return any(has_bias(m) for m in norms)
