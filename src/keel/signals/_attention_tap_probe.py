"""What the attention probes share: one `AttentionTap` on the model, armed per step, read once per step."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from keel._core.errors import KeelWarning
from keel.signals import _attention_tap
from keel.signals._hooks import looks_like_sequence_model
from keel.signals.probe import Measurements, StepContext


class NoAttentionFoundWarning(KeelWarning):
    """An attention probe found no attention module to watch; it measures nothing."""


class AttentionTapProbe:
    """A probe measured inside the attention modules' forward by the model's shared `AttentionTap`.

    A subclass sets ``name`` and ``config`` (with ``modules``: the attention modules' names, or None to find them),
    says in ``_arm(step)`` what the tap must reduce at ``step``, and turns the tapped sites into measurements in
    ``read()``.
    """

    name: str
    config: Any
    read: Callable[[], Measurements]  # this step's values (what `measure` returns), without re-arming
    _arm: Callable[[int], None]  # what the tap must reduce at the given step

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._tap: _attention_tap.AttentionTap | None = None

    def attach(self, model: nn.Module) -> None:
        self._model = model
        self._tap = _attention_tap.tap_for(model, self.config.modules)
        if not self._tap.sites and looks_like_sequence_model(model):
            warnings.warn(
                f"{self.name}: no attention module found in {type(model).__name__}; pass modules=[...] to name them",
                NoAttentionFoundWarning,
                stacklevel=2,
            )
        self._arm(0)

    def detach(self) -> None:
        if self._model is not None:
            _attention_tap.release(self._model, self)
        self._model = self._tap = None

    def measure(self, ctx: StepContext) -> Measurements:
        out = self.read()
        self._arm(ctx.step + 1)
        return out

    def after_step(self, ctx: StepContext) -> Measurements:
        return {}

    def _tapped_sites(self) -> list[_attention_tap.SiteStats]:
        """The sites the tap measured this step ([] without a tap); raises the tap's own failure."""
        if self._tap is None:
            return []
        if self._tap.error is not None:
            raise RuntimeError(f"attention tap failed: {self._tap.error!r}") from self._tap.error
        return self._tap.read()
