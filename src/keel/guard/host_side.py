"""`host_side`: ``torch.compiler.disable`` applied at the first call made with ``torch.compile`` in use, not at import.

``@torch.compiler.disable`` on `Guard.step` imported ``torch._dynamo`` with ``keel.guard``: 2.7 s of the 3.2 s that
``import keel.guard`` took (``python -X importtime``), for every loop, compiled or not. Nothing can be compiling
while ``torch._dynamo`` is not imported (``torch.compile`` imports it), so until then the function is called as it
is. Once it is imported, calls go through ``torch.compiler.disable(fn)``, made once, and the wrapper itself is left
to run in eager mode (``skip_code``): dynamo, tracing a caller, breaks the graph at it as it did at the decorated
function, and does not trace the wrapper's frame either.

The disabled function is made at the first call after ``torch._dynamo`` is imported, or earlier by `compile_ready`
(the `Guard` calls it when built: a model compiled before keel's line). A first call made while dynamo traces its
caller (a ``torch.compile``'d train step written after the Guard was built, never run eagerly) makes it from inside
that trace: the graphs compiled are the same, the trace of that first call only counts a few more graph breaks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def host_side(fn: F) -> F:
    """``torch.compiler.disable(fn)``, without importing ``torch._dynamo`` before it is in use (module docstring).

    Example:
        >>> @host_side
        ... def bookkeeping(x):
        ...     return x + 1
        >>> bookkeeping(1)
        2
    """
    disabled: list[Callable[..., Any]] = []  # torch.compiler.disable(fn), once made

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            if "torch._dynamo" not in sys.modules:  # torch.compile was never used: nothing is compiling
                return fn(*args, **kwargs)
            _make_disabled(fn, call, disabled)
        return disabled[0](*args, **kwargs)

    # what torch.compiler.disable marks its wrapper with: dynamo breaks the graph at a call of it, not tracing in
    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    _WAITING.append((fn, call, disabled))
    return call  # type: ignore[return-value]


def compile_ready() -> None:
    """Make the disabled functions now if ``torch._dynamo`` is imported (a model compiled already), so that none is
    made from inside a trace."""
    while _WAITING and "torch._dynamo" in sys.modules:
        _make_disabled(*_WAITING.pop())


def _make_disabled(fn: Callable[..., Any], wrapper: Callable[..., Any], disabled: list[Callable[..., Any]]) -> None:
    """``torch.compiler.disable(fn)`` into ``disabled``, and the wrapper's own frame marked for dynamo to run as is."""
    if disabled:
        return
    from torch._dynamo import eval_frame  # noqa: PLC0415  (imported already: see the callers)

    skip_code = getattr(eval_frame, "skip_code", None)  # torch >= 2.4 has it; without it dynamo traces the wrapper,
    if skip_code is not None:  # whose call of the disabled function then breaks the graph: more breaks, same graphs
        skip_code(wrapper.__code__)
    disabled.append(torch.compiler.disable(fn))


# the host_side functions whose disabled function is not made yet: (fn, its wrapper, the list that will hold it)
_WAITING: list[tuple[Callable[..., Any], Callable[..., Any], list[Callable[..., Any]]]] = []
