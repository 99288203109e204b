"""Handoff: a trainer keeps calling its own ``optimizer.step()`` and ``scheduler.step()``; keel's `Guard` decides.

The Hugging Face ``Trainer`` and Lightning call the optimizer and the LR scheduler themselves, so an adapter
cannot simply call ``Guard.step`` in their place. Instead it replaces, on the trainer's own objects, the calls
that change training state with small gates:

- the trainer's *update call* (its optimizer's ``step``, or the GradScaler's ``step`` when the trainer drives
  one) goes to ``Guard.step(loss)``, which measures, decides, and then steps, skips or rolls back itself,
  calling the original methods;
- the trainer's ``scheduler.step()`` does nothing when keel handled the update (``Guard`` stepped the
  scheduler, or rightly did not on a skip) and goes through when it did not;
- a call made while ``Guard`` is acting goes straight to the original (`Handoff.acting`).

So all the logic stays in `Guard`; the adapters only say where the loss comes from. stabilityguard's HF
callback wrapped the optimizer but never handed it back to the trainer, which left it inert
(the PyPI package stabilityguard, tried by hand); here the trainer's own objects are patched in place, and
`restore` undoes it.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Handoff:
    """The gates on one trainer's objects, and whether keel handled the current update.

    Attributes:
        acting: True while `Guard` is acting: gated calls then go straight to the originals.
        handled: True when keel handled the last update (the trainer's scheduler call is then a no-op).
    """

    def __init__(self) -> None:
        self.acting = False
        self.handled = False
        self._patches: list[tuple[Any, str, Any, Any, bool]] = []
        self._live: set[int] = set()  # ids of the gates not restored yet

    def gate(self, obj: Any, name: str, outside: Callable[..., Any]) -> None:
        """Replace ``obj.<name>`` so that a call from outside keel runs ``outside(original, *args, **kwargs)``.

        Attributes of the original (e.g. ``torch.optim.lr_scheduler``'s ``_wrapped_by_lr_sched`` mark) are kept. A
        method of an instance (``optimizer.step``) is replaced by a method bound to it, as torch's LR schedulers
        expect: one built after keel unwraps ``optimizer.step.__func__`` to count the calls (a plain function
        raised AttributeError in the scheduler's constructor). A gate something else wrapped since passes every
        call through once `restore` ran.
        """
        original = getattr(obj, name)

        @functools.wraps(original)
        def gate_function(*args: Any, **kwargs: Any) -> Any:
            if self.acting or id(gated) not in self._live:
                return original(*args, **kwargs)
            return outside(original, *args, **kwargs)

        gated: Any = gate_function
        gate_function._keel_gate_dead = lambda: id(gated) not in self._live  # type: ignore[attr-defined]
        if inspect.ismethod(original) and original.__self__ is obj:

            @functools.wraps(original)
            def method(_bound_to: Any, *args: Any, **kwargs: Any) -> Any:
                return gate_function(*args, **kwargs)

            gated = types.MethodType(method, obj)
        had_own = name in vars(obj)
        setattr(obj, name, gated)
        self._patches.append((obj, name, original, gated, had_own))
        self._live.add(id(gated))

    def gate_scheduler(self, scheduler: Any, outside: Callable[..., Any] | None = None) -> None:
        """By default the trainer's ``scheduler.step()`` is a no-op when keel handled the update (Guard owns it
        then); ``outside`` replaces that, as in `gate`."""

        def handed_to_keel(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return None if self.handled else original(*args, **kwargs)

        self.gate(scheduler, "step", outside or handed_to_keel)
        self._keep_out_of_state_dict(scheduler)

    def _keep_out_of_state_dict(self, scheduler: Any) -> None:
        """torch's ``LRScheduler.state_dict`` returns its ``__dict__``, where the gate lives: a Trainer's checkpoint
        (``torch.save``) could not pickle it and keel's snapshots would carry it. The gates are left out of it."""
        original = getattr(scheduler, "state_dict", None)
        if not callable(original):
            return

        @functools.wraps(original)
        def state_dict(*args: Any, **kwargs: Any) -> Any:
            state = original(*args, **kwargs)
            gates = {id(gated) for obj, _, _, gated, _ in self._patches if obj is scheduler}
            return {k: v for k, v in state.items() if id(v) not in gates} if isinstance(state, dict) else state

        had_own = "state_dict" in vars(scheduler)
        scheduler.state_dict = state_dict
        self._patches.append((scheduler, "state_dict", original, state_dict, had_own))

    @contextmanager
    def acting_for_keel(self) -> Iterator[None]:
        """While inside, gated calls reach the originals (Guard calls them to step, skip or roll back)."""
        self.acting = True
        try:
            yield
        finally:
            self.acting = False

    def restore(self) -> None:
        """Put the original methods back (only where nobody patched on top of keel since)."""
        self._live = set()
        for obj, name, original, gated, had_own in reversed(self._patches):
            if getattr(obj, name, None) is gated:
                if had_own:
                    setattr(obj, name, _past_closed_gates(original))
                else:
                    delattr(obj, name)
        self._patches = []


def _past_closed_gates(original: Any) -> Any:
    """``original`` without the gates of Handoffs restored since, which it may wrap: two watches closed in the order
    they were made (a GAN's D, then G) left D's gate under G's in ``Tensor.backward``, where G's restore put it back
    for the rest of the process (passing calls through, but one call deeper on every backward)."""
    while getattr(original, "_keel_gate_dead", lambda: False)():
        original = original.__wrapped__
    return original
