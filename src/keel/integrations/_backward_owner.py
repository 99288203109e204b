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
model, takes them too. With one watch open every backward is its, and nothing is hooked.

Which models a backward reached is learnt from the backward itself: while two or more watches are open, each watched
parameter that requires a gradient carries a post-accumulate-grad hook, a list's ``append`` (a C call), that notes it
as its gradient lands; after the backward, `BackwardOwners.settle` maps the noted parameters to their watches. Before,
the loss's autograd graph was walked in Python before the backward, the whole graph when the loss did not reach every
watched model (a GAN's D-only losses): 2-29 ms per backward of a 24-layer GPT-2 on a shared CPU, now about 0.1 ms
(reviewer W12). A parameter frozen when its watch opened (``requires_grad=False``) carries no hook: a
backward that reaches the model only through parameters unfrozen later is not seen as reaching it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.utils.hooks import RemovableHandle


class Backward:
    """One ``backward()`` call's loss: the watches it reached (None until its backward has run, see
    `BackwardOwners.settle`), and whether one of them has taken it."""

    __slots__ = ("reached", "taken")

    def __init__(self, reached: frozenset[int] | None) -> None:
        self.reached = reached
        self.taken = False


class BackwardOwners:
    """The open watches' parameters, and the backward call in flight (each watch's hook sees the same call)."""

    def __init__(self) -> None:
        self._owners: dict[int, set[int]] = {}  # id(parameter) -> the keys of the watches over it
        self._parameters: dict[int, Tensor] = {}  # id(parameter) -> the parameter, to hook while 2+ watches are open
        self._hooks: dict[int, RemovableHandle] = {}
        self._keys: set[int] = set()
        self._in_flight: tuple[Tensor, Backward] | None = None
        # the parameters the backward in flight has given a gradient so far: each hook is this list's append, a C
        # call, so a backward pays no Python frame per parameter; `settle` reads them
        self._landed: list[Tensor] = []

    def open(self, key: int, parameters: Iterable[Tensor]) -> None:
        """A watch opened over these parameters."""
        self._keys.add(key)
        for p in parameters:
            self._owners.setdefault(id(p), set()).add(key)
            self._parameters[id(p)] = p
        self._hook_while_shared()

    def close(self, key: int) -> None:
        self._keys.discard(key)
        for p in [p for p, keys in self._owners.items() if keys == {key}]:
            del self._owners[p], self._parameters[p]
            handle = self._hooks.pop(p, None)
            if handle is not None:
                handle.remove()
        for keys in self._owners.values():
            keys.discard(key)
        self._hook_while_shared()

    def enter(self, loss: Tensor) -> tuple[Backward, bool]:
        """The `Backward` of this call, and True for the first hook to see it (it must call `leave`)."""
        if self._in_flight is not None and self._in_flight[0] is loss:
            return self._in_flight[1], False
        backward = Backward(frozenset(self._keys) if len(self._keys) < 2 else None)
        self._landed.clear()
        self._in_flight = (loss, backward)
        return backward, True

    def settle(self, backward: Backward) -> frozenset[int]:
        """The watches ``backward`` reached; call once its backward has run (the hooks have marked them)."""
        if backward.reached is None:
            reached: set[int] = set()
            for p in self._landed:
                reached.update(self._owners.get(id(p), ()))
                if len(reached) == len(self._keys):
                    break
            self._landed.clear()
            backward.reached = frozenset(reached)
        return backward.reached

    def leave(self) -> None:
        self._in_flight = None

    def drop_outside(self) -> None:
        """Forget the gradients that landed outside a hooked ``backward()`` call (``torch.autograd.backward``):
        nothing reads them, and a loop that only calls that would grow the list at every step. Called at each
        update, when no backward is in flight."""
        if self._in_flight is None:
            self._landed.clear()

    def _hook_while_shared(self) -> None:
        """Hook every watched parameter that takes a gradient while two or more watches are open; none otherwise."""
        if len(self._keys) < 2:
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
            return
        for p_id, p in self._parameters.items():
            if p_id not in self._hooks and p.requires_grad:
                self._hooks[p_id] = p.register_post_accumulate_grad_hook(self._landed.append)


OWNERS = BackwardOwners()  # one per process: every open watch hooks the same ``Tensor.backward``
