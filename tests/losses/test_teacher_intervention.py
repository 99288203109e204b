"""Teacher intervention loss: a hand-computed value, zero for a student equal to its teacher, no gradient into the
teacher, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keel.losses import teacher_intervention_loss


def test_each_layer_gets_the_teachers_input_and_is_matched_to_the_teachers_output_hand_computed() -> None:
    # layer 0 doubles, layer 1 adds 1; teacher states h0 = [1, 2], h1 = [2, 5], h2 = [4, 4]
    # student_0(h0) = [2, 4] vs h1: errors [0, -1] → MSE 0.5; student_1(h1) = [3, 6] vs h2: [-1, 2] → 2.5; mean 1.5
    states = [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 5.0]), torch.tensor([4.0, 4.0])]
    loss = teacher_intervention_loss([lambda x: 2 * x, lambda x: x + 1], states, weight=2.0)
    assert loss.item() == pytest.approx(3.0)


def test_a_student_equal_to_its_teacher_has_zero_loss_whatever_the_errors_below() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    x = torch.randn(5, 6)
    states = [x, teacher[1](teacher[0](x)), teacher(x)]
    student = [lambda h: teacher[1](teacher[0](h)), teacher[2]]
    assert teacher_intervention_loss(student, states).item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_the_student_and_never_the_teacher_states() -> None:
    student = nn.Linear(3, 3)
    states = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    teacher_intervention_loss([student], states).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(s.grad is None for s in states)


def test_half_precision_layers_give_a_float32_loss() -> None:
    states = [torch.randn(2, 4, dtype=torch.bfloat16) for _ in range(2)]
    assert teacher_intervention_loss([lambda h: h * 2], states).dtype == torch.float32


@pytest.mark.parametrize(
    ("layers", "n_states", "weight", "match"),
    [([], 1, 1.0, "no student layer"), ([abs], 3, 1.0, "3 teacher states for 1 layers"), ([abs], 2, -1.0, "weight")],
)
def test_bad_arguments_give_one_clear_error(layers: list, n_states: int, weight: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        teacher_intervention_loss(layers, [torch.zeros(2)] * n_states, weight=weight)
