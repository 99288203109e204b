"""The optimizer shape SPAM and Stable-SPAM share: an update per bucket of parameters, float32 state kept as saved."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, overload

import torch
from torch import Tensor
from torch.optim import Optimizer

from keel.optim._helpers import Scratch, restore_state_dtypes, step_buckets


class BucketedOptimizer(Optimizer):
    """An optimizer whose ``step`` calls ``_update(params, group)`` once per parameter group and (device, dtype)
    bucket of parameters with a gradient (`step_buckets`), with a `Scratch` of reusable buffers, and whose
    ``load_state_dict`` keeps float32 moments and statistics exactly as saved (torch would cast them to each
    parameter's dtype). A subclass defines ``_update``, its update rule for one bucket."""

    _update: Callable[[list[Tensor], dict[str, Any]], None]

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._scratch = Scratch()

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one update to every parameter that has a gradient; returns the closure's loss if given.

        Runs eagerly inside a ``torch.compile``'d function (one graph break there, as at ``zero_grad``): the update
        is planned on the host from Python step counts, which dynamo would recompile at every step, and the CPU path's
        fused AdamW kernel failed functionalization ("mutating a non-functional tensor with a functional tensor").
        """
        return step_buckets(self, closure, self._update)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, ``copy.deepcopy`` and ``load_state_dict`` come through here (torch's idiom). The scratch
        buffers, which ``Optimizer.__getstate__`` leaves out, start empty (before: AttributeError '_scratch' at the
        copy's first step); a group saved without one of this optimizer's settings (``torch.optim.AdamW``'s state
        dict has no ``threshold``) takes the default (before: KeyError at the next step)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if "_scratch" not in self.__dict__:  # load_state_dict keeps its buffers
            self._scratch = Scratch()
