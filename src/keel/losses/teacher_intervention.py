"""Teacher intervention: layer-wise distillation in which each quantized layer gets the full-precision teacher's
intact input, so quantization errors of the layers below it do not reach it.

After Kim et al. 2023, "Teacher Intervention: Improving Convergence of Quantization Aware Training for Ultra-Low
Precision Transformers", EACL 2023, arXiv 2302.11812 (seed-catalog #15). Written from the abstract; the paper's code
was not read here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from keel.losses._checks import check_number


def teacher_intervention_loss(
    student_layers: Sequence[Callable[[Tensor], Tensor]],
    teacher_states: Sequence[Tensor],
    *,
    weight: float = 1.0,
) -> Tensor:
    """Mean over layers of MSE(student_l(h_l), h_{l+1}), with h the teacher's hidden states, detached.

    In a plain quantization-aware fine-tune each quantized layer sees the output of the quantized layers below it,
    and their rounding errors add up through the depth; at 2 bits this interference makes QAT of a pre-trained
    Transformer converge slowly and unstably. Teacher intervention feeds every student layer the teacher's own
    (full-precision) input h_l instead and asks it to reproduce the teacher's output h_{l+1}: each layer learns
    against intact signals, and the loss surface is smoother. Add it to the task loss (or use it alone for a
    first phase), e.g. ``loss = task_loss + teacher_intervention_loss(blocks, teacher_out.hidden_states)``.

    What is implemented and what is not: the layer-wise intervention as a distillation loss, each layer (or any
    sub-section you pass) given the teacher's intact input, as the abstract describes it ("intervenes layer-wise
    signal propagation with the intact signal from the teacher"). The paper's own modes replace signals inside the
    student's forward — the self-attention output (TI-O) or the attention map (TI-M) — and its gradual
    intervention (TI-G) moves between them over training; those forward-pass interventions and that schedule are
    not implemented here. To intervene on a sub-section, pass it with the teacher's input and output of that
    sub-section.

    Args:
        student_layers: L callables, the quantized student's layers (a block, or a wrapper that supplies a Hugging
            Face decoder layer's masks and position embeddings and returns its hidden states).
        teacher_states: L + 1 tensors: the teacher's input to its first layer and each layer's output (Hugging
            Face's ``output_hidden_states=True`` gives exactly these for a decoder without a final norm in them).
            Detached here: no gradient reaches the teacher.
        weight: Multiplies the mean (≥ 0).

    Returns:
        A 0-d tensor (float32 or wider), differentiable in the student layers' parameters.

    Raises:
        ValueError: no layer, ``len(teacher_states) != len(student_layers) + 1``, or a bad ``weight``.

    Example:
        >>> layers = [torch.nn.Linear(4, 4) for _ in range(2)]
        >>> states = [torch.randn(3, 4) for _ in range(3)]
        >>> teacher_intervention_loss(layers, states).shape
        torch.Size([])

    References:
        Kim et al. 2023, Teacher Intervention, EACL, arXiv 2302.11812.
    """
    check_number("teacher_intervention_loss weight", weight, low=0.0)
    if not student_layers:
        raise ValueError("teacher_intervention_loss got no student layer; allowed: at least one")
    if len(teacher_states) != len(student_layers) + 1:
        raise ValueError(
            f"teacher_intervention_loss: {len(teacher_states)} teacher states for {len(student_layers)} layers; "
            "allowed: one more state than layers (the first layer's input, then every layer's output)"
        )
    terms = []
    for layer, inputs, target in zip(student_layers, teacher_states[:-1], teacher_states[1:], strict=True):
        out = layer(inputs.detach())
        wide = torch.promote_types(out.dtype, torch.float32)
        terms.append((out.to(wide) - target.detach().to(wide)).square().mean())
    return weight * torch.stack(terms).mean()
