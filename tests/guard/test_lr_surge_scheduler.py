"""A schedule that returns ×100 for one step, stepped by keel (`Guard(scheduler=...)`, as the HF and Lightning
callbacks do): the update is skipped for the LR surge, and keel steps the scheduler after that skip all the same, so
the schedule's next value replaces the surge. Withheld, the surged LR stayed: it was refused three times, then taken
as the loop's own and applied (helper V's V5, torchtune's LambdaLR; the same as keel.watch's fix)."""

import torch

from keel import Guard

SURGE_AT = 12


def _factor(step):
    return 100.0 if step == SURGE_AT else 1.0


def _run(policy):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _factor)
    decisions, lrs = [], []
    with Guard(model, opt, scheduler, policy=policy) as guard:
        for _ in range(20):
            lrs.append(opt.param_groups[0]["lr"])
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            decisions.append(guard.step(loss))
            opt.zero_grad()
    return decisions, lrs


def test_a_surge_the_schedule_made_costs_one_skipped_update():
    decisions, lrs = _run("skip")
    assert [d.step for d in decisions if not d.stepped] == [SURGE_AT]
    assert lrs[SURGE_AT] == 1.0 and lrs[SURGE_AT + 1] == 0.01  # the schedule's next value, not the surge again
    assert all(lr == 0.01 for i, lr in enumerate(lrs) if i != SURGE_AT)


def test_observe_applies_it_as_the_loop_would():
    decisions, lrs = _run("observe")
    assert all(d.stepped for d in decisions) and lrs[SURGE_AT] == 1.0
