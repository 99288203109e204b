"""Which open `keel.watch` a ``loss.backward()`` belongs to, when a loop has one watch per optimizer (a GAN).

pytorch/examples' ``dcgan/main.py`` trains the discriminator, then the generator, each with its own backward and
its own optimizer, and the generator's loss runs through the discriminator too::

    errD_real.backward(); errD_fake.backward(); optimizerD.step()
    errG.backward(); optimizerG.step()

With ``keel.watch(netD, optimizerD)`` and ``keel.watch(netG, optimizerG)`` both watches hook ``Tensor.backward``,
so each sees every backward; before this, D's next update took errG as its loss too, and a NaN in G's loss skipped
D's update as well as G's. A backward's loss now belongs to **the first watch that updates after it, among the
watches whose model it reached** (a parameter of the model is in its graph): errD_real and errD_fake are D's, errG
is G's (G updates before D's next update, although errG reached D). Two models trained side by side (backward A,
backward B, step A, step B) each get their own loss. Two trained on one loss (an encoder and a decoder, one optimizer
each) both get it: a watch whose update finds only backwards another watch took, with no newer one that reached its
model, takes them too. With one watch open nothing is walked: every backward is its.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor


class Backward:
    """One ``backward()`` call's loss: the watches it reached, and whether one of them has taken it."""

    __slots__ = ("reached", "taken")

    def __init__(self, reached: frozenset[int]) -> None:
        self.reached = reached
        self.taken = False


class BackwardOwners:
    """The open watches' parameters, and the backward call in flight (each watch's hook sees the same call)."""

    def __init__(self) -> None:
        self._owners: dict[int, set[int]] = {}  # id(parameter) -> the keys of the watches over it
        self._keys: set[int] = set()
        self._in_flight: tuple[Tensor, Backward] | None = None

    def open(self, key: int, parameters: Iterable[Tensor]) -> None:
        """A watch opened over these parameters."""
        self._keys.add(key)
        for p in parameters:
            self._owners.setdefault(id(p), set()).add(key)

    def close(self, key: int) -> None:
        self._keys.discard(key)
        for p in [p for p, keys in self._owners.items() if keys == {key}]:
            del self._owners[p]
        for keys in self._owners.values():
            keys.discard(key)

    def enter(self, loss: Tensor) -> tuple[Backward, bool]:
        """The `Backward` of this call, and True for the first hook to see it (it must call `leave`)."""
        if self._in_flight is not None and self._in_flight[0] is loss:
            return self._in_flight[1], False
        reached = frozenset(self._keys) if len(self._keys) < 2 else self._watches_reached(loss)
        backward = Backward(reached)
        self._in_flight = (loss, backward)
        return backward, True

    def leave(self) -> None:
        self._in_flight = None

    def _watches_reached(self, loss: Tensor) -> frozenset[int]:
        """The watches with a parameter in the loss's graph (the walk stops once every open watch is found)."""
        found: set[int] = set()
        seen: set[int] = set()
        stack: list[Any] = [loss.grad_fn]
        while stack and len(found) < len(self._keys):
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)  # an AccumulateGrad: the leaf (parameter) it feeds
            if variable is not None:
                found.update(self._owners.get(id(variable), ()))
            stack.extend(child for child, _ in node.next_functions)
        return frozenset(found)


OWNERS = BackwardOwners()  # one per process: every open watch hooks the same ``Tensor.backward``
