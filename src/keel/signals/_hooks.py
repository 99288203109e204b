"""Helpers shared by the activation probes: finding the modules to hook, pausing every hook at once, and the hook
object a copy of the model carries inert.

Activation probes reduce inside forward hooks and keep no tensors. Forwards that are not training steps
(evaluation in ``model.eval()``, an RL loop's rollouts and old/reference log-probs under ``torch.no_grad()`` with
the model left in train mode, the extra forward of the sharpness probe) must not leak into a step's values: hooks
observe only a module in train mode under autograd (`observing`), as keel's loss capture does, and `quiet` pauses
all keel hooks for a block of code. (Reentrant activation checkpointing runs each block's first forward under
no_grad and its recompute with autograd: the hooks see each block once, at the recompute.)

Under ``torch.compile`` the hooks of a compiled model are traced into its graph. What a hook does there must
be traceable (no host reads, no storage addresses, no tensor hooks that change Python state: each would break
the user's graph, and raise under ``fullgraph=True``), and any Python number it keeps across calls must not
grow with each call: dynamo specialises on the ints it reads, so it would recompile the forward for every
micro-batch of a step (`add_count`).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

_state = threading.local()

# Class names of attention modules in the wild: GPT2Attention, LlamaAttention, CausalSelfAttention (nanoGPT,
# keel's proxy), MultiheadAttention, timm's Attention, ...Attn.
_ATTENTION_CLASS = re.compile(r"(Attention|Attn)$")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Pause every keel activation hook in this thread for the block (nestable).

    Example:
        >>> with quiet():
        ...     hooks_active()
        False
    """
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def hooks_active() -> bool:
    """False inside `quiet`."""
    return getattr(_state, "depth", 0) == 0


def observing(module: nn.Module) -> bool:
    """Whether a hook on ``module`` measures this forward: a training forward (train mode, autograd on, outside
    `quiet`). A forward under ``torch.no_grad()`` or ``inference_mode`` trains nothing, even in train mode."""
    return module.training and torch.is_grad_enabled() and hooks_active()


class ObserverHook:
    """A forward (pre-)hook through which keel observes a module of the user's model.

    Torch keeps hooks on the module, so every copy of the model takes them along: ``copy.deepcopy(model)`` (an EMA
    or a DPO reference model) and ``torch.save(model)`` (a whole-model checkpoint). A plain function hook makes the
    copy's forwards feed keel's probes (a deep copy shares the function), and a bound method or a closure drags the
    probe, the guard and its open store into the pickle, which fails and kills the run. This hook copies and
    pickles as an inert one: the copy's forwards run it and it does nothing; the original keeps observing.

    Example:
        >>> import copy
        >>> seen = []
        >>> hook = ObserverHook(lambda *args: seen.append(len(args)))
        >>> hook(1, 2), copy.deepcopy(hook)(1, 2), seen
        (None, None, [2])
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any] | None = None) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.fn is None else self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ObserverHook:
        return ObserverHook()

    def __reduce__(self) -> tuple[type, tuple]:
        return ObserverHook, ()


def compiling() -> bool:
    """True while ``torch.compile`` traces (a constant in the traced code: testing it breaks no graph)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def add_count(total: int | Tensor | None, n: int, like: Tensor) -> int | Tensor:
    """``total + n`` for a count a hook keeps across the calls of one step (elements, rows).

    A Python int in eager mode (free); while ``torch.compile`` traces, a 0-d float32 tensor on ``like``'s device
    (a fill, no host copy), so that the count of the 2nd, 3rd, … micro-batch is one graph input rather than a
    constant dynamo guards on and recompiles for.

    Example:
        >>> add_count(add_count(None, 3, torch.zeros(1)), 4, torch.zeros(1))
        7
    """
    if compiling():
        n_t = torch.full((), n, dtype=torch.float32, device=like.device)
        return n_t if total is None else total + n_t
    return n if total is None else total + n


def named_modules_by_name(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The named submodules, in the order given; raises ValueError naming any that do not exist."""
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table]
    if missing:
        sample = ", ".join(list(table)[1:8])
        raise ValueError(
            f"modules={missing!r} not found in {type(model).__name__}; allowed: submodule names such as {sample}"
        )
    return [(n, table[n]) for n in names]


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose class name ends in ``Attention``/``Attn``, in registration order.

    Outermost, so that BERT's ``BertAttention`` (which holds ``BertSelfAttention``) counts once.
    """
    if _ATTENTION_CLASS.search(type(model).__name__):
        return [("", model)]  # the model itself is one attention module
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _ATTENTION_CLASS.search(type(module).__name__) and not any(
            name.startswith(outer + ".") for outer, _ in found
        ):
            found.append((name, module))
    return found


def looks_like_sequence_model(model: nn.Module) -> bool:
    """True when the model has something named like attention, or token embeddings and no recurrent layer.

    Attention and block probes warn about finding nothing only then; on a CNN, an MLP or an RNN/LSTM/GRU an
    absent attention module (and residual block list) is expected, and the probe sets must not nag about it.
    """
    modules = list(model.named_modules())
    if any(re.search(r"(?i)attn|attention", name or "") for name, _ in modules):
        return True
    recurrent = any(isinstance(m, nn.RNNBase | nn.RNNCellBase) for _, m in modules)
    return not recurrent and any(isinstance(m, nn.Embedding) for _, m in modules)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks: children of the longest ``nn.ModuleList`` whose children share one class.

    That is ``blocks`` in keel's proxy and nanoGPT (``transformer.h``), ``transformer.h`` in GPT-2,
    ``model.layers`` in Llama and ``layers`` in ``nn.TransformerEncoder``.
    """
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= len(best):
            continue
        children = list(module.named_children())
        if children and len({type(m) for _, m in children}) == 1 and any(True for _ in module.parameters()):
            prefix = f"{name}." if name else ""
            best = [(prefix + child, m) for child, m in children]
    return best


def find_output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The module that produces the output logits.

    In order: Hugging Face's ``get_output_embeddings()``; a module named ``lm_head``, ``head`` or ``output``;
    the last ``nn.Linear`` registered in the model.
    """
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            for name, module in model.named_modules():
                if module is head:
                    return name, module
    table = dict(model.named_modules())
    for candidate in ("lm_head", "head", "output"):
        if isinstance(table.get(candidate), nn.Module) and any(True for _ in table[candidate].parameters()):
            return candidate, table[candidate]
    linears = [(n, m) for n, m in table.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
