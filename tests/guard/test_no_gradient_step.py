"""A step where no parameter got a gradient while the loop still clipped (``clip_grad_norm_`` returns 0 over no
gradients) and gave keel that norm: keel's measurement took the norm's device from the first parameter with a gradient
and raised IndexError inside the Guard, recorded as a keel error on every such step (helper V's V4)."""

import torch

from keel import Guard


def test_a_step_with_no_gradient_and_the_loops_clip_norm_records_no_keel_error():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, policy="skip") as guard:
        for _ in range(3):
            loss = model(torch.randn(2, 4)).pow(2).mean().detach()  # the loop forgot backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            guard.step(loss, grad_norm=norm)
    assert not [f for f in guard.findings if f.kind == "keel_error"], [f.cause for f in guard.findings]
