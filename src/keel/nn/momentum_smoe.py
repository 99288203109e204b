"""MomentumSMoE's heavy-ball residual for MoE layers, as hooks on an existing model (Teo & Nguyen 2024).

The paper (arXiv 2410.14574; official code ``rachtsy/MomentumSMoE @ b43846f``, ``models.py``) carries a momentum
state p through the layer stack, zero at the embedding, and at each sparse MoE layer computes

    p ← μ·p + γ·SMoE(x);   x ← x − p

with μ = 0.7 and γ = 1 in every released script. With μ = 0 and γ = 1 it is the ordinary residual up to the sign
of the learned SMoE output, which the official code lets training absorb. keel ports it onto a model that already
exists, whose layers compute ``x + block(x)``: the hook makes the block return p, so the layer computes x + p with
p ← μ·p + γ·block(x) — the same recursion with the sign kept, so μ = 0, γ = 1 leaves a pretrained model's function
exactly as it was. Attention layers, which the paper lets pass p unchanged, are not touched.

Not ported: the AdamSMoE variant (the official first-layer branch), whose released expression
``input − (γ1·m/√(v+ε) + input)`` cancels the layer's residual input (reference/seed-catalog.md T9).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from keel.losses._checks import check_number

# Every script of the official code (scripts/smoe-mom-{s,m,l}.sh) uses these.
MOMENTUM = 0.7
STEP_SIZE = 1.0


def check_momentum_options(owner: str, momentum: object, step_size: object) -> None:
    """Raise one ValueError naming ``owner.<option>`` unless μ is in [0, 1] and γ > 0 (finite numbers)."""
    check_number(f"{owner}.momentum", momentum, low=0.0, high=1.0)
    check_number(f"{owner}.step_size", step_size, low=0.0, low_open=True)


class MomentumState:
    """The momentum p of the current forward, shared by the MoE blocks of one model; None between forwards."""

    def __init__(self) -> None:
        self.p: Tensor | None = None

    def reset(self, *_: Any) -> None:
        """Forget p (a forward pre-hook and forward hook of the model: p starts at 0 with every forward)."""
        self.p = None


class MomentumResidualHook:
    """Forward hook on an MoE block: returns p ← μ·p + γ·block(x) in place of block(x).

    The first MoE block of a forward (p unset, or of another shape) starts from p = 0: it returns γ·block(x).

    Args:
        state: The model's shared `MomentumState`.
        momentum: μ (0.7).
        step_size: γ (1.0).
    """

    def __init__(self, state: MomentumState, momentum: float = MOMENTUM, step_size: float = STEP_SIZE) -> None:
        check_momentum_options("MomentumResidualHook", momentum, step_size)
        self.state, self.momentum, self.step_size = state, float(momentum), float(step_size)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        f = output if isinstance(output, Tensor) else output[0]
        previous = self.state.p
        p = self.step_size * f
        if previous is not None and previous.shape == f.shape:
            p = p + self.momentum * previous.to(f.dtype)
        self.state.p = p
        if isinstance(output, Tensor):
            return p
        return type(output)((p, *output[1:]))
