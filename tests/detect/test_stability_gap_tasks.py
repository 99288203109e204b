"""The stability gap is judged on tasks trained before the switch only: an eval of a task not trained yet that falls
at a switch is not a gap (De Lange et al.'s gap is a learned task's transient collapse).

Outside-in shape: an Avalanche-style loop (one `Guard.phase` per experience, from step 0; every experience's test
set evaluated every few iterations with ``task=`` its experience), domain-incremental, so a future experience's eval
is above chance before it is trained and can fall when the model moves to another experience.
"""

from __future__ import annotations

import torch
from torch import nn

from keel import Guard
from keel._core import keys
from keel._core.observation import Observation
from keel.detect.stability_gap import StabilityGapDetector

SWITCHES = {30: "b", 60: "c"}
LEVELS = {  # per eval, its scripted accuracy: 6 evals (every 5 steps) per phase
    "a": [0.80, 0.82, 0.81, 0.80, 0.82, 0.81] + [0.30, 0.50, 0.80, 0.81, 0.80, 0.81] + [0.80] * 6,
    "b": [0.50, 0.52, 0.51, 0.50, 0.52, 0.51] + [0.70, 0.80, 0.85, 0.86, 0.85, 0.86] + [0.85] * 6,
    "c": [0.60, 0.62, 0.61, 0.60, 0.62, 0.61] + [0.20, 0.25, 0.55, 0.60, 0.61, 0.60] + [0.70] * 6,
}


def _run(tmp_path, first_phase: str | None = "a") -> list:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scripted = {task: iter(values) for task, values in LEVELS.items()}
    with Guard(model, opt, run_dir=str(tmp_path), policy="skip") as guard:
        for task in LEVELS:
            guard.evaluate(task, lambda m, t=task: next(scripted[t]), every=5, task=task)
        if first_phase is not None:
            guard.phase(first_phase)
        for step in range(90):
            if step in SWITCHES:
                guard.phase(SWITCHES[step])
            loss = model(torch.ones(2, 4)).pow(2).mean()
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    return [(f.signal, f.severity, f.step) for f in guard.findings if f.kind == "stability_gap"]


def test_a_future_tasks_eval_falling_at_a_switch_is_not_a_gap_while_the_trained_tasks_gap_is(tmp_path):
    # a (trained in phase 0) falls .81 -> .30 at the switch to b: a gap, warned at its second low eval (step 39).
    # c, not trained until step 60, falls .61 -> .20 at the same switch: not a gap (it was never learned).
    # b is the task the switch starts: not judged either.
    assert _run(tmp_path) == [("eval/a", "warning", 39), ("eval/a", "info", 44)]


def test_without_a_phase_named_at_step_0_the_unnamed_first_steps_may_have_trained_any_task(tmp_path):
    # No phase before step 30: the steps before are phase "start", which names no task, so a task no phase names
    # yet (a, c) may have been trained there and is judged as before; b, the phase the switch starts, is not.
    found = _run(tmp_path, first_phase=None)
    assert ("eval/a", "warning", 39) in found and ("eval/c", "warning", 39) in found
    assert not [f for f in found if f[0] == "eval/b"]


def _obs(step: int, phase: float, **evals: float) -> Observation:
    return Observation(step=step, values={**{f"eval/{k}": v for k, v in evals.items()}, keys.PHASE_INDEX: phase})


def test_the_detector_skips_keys_whose_task_no_earlier_phase_trained():
    det = StabilityGapDetector()
    det.note_phases([(0, "a"), (40, "b")])
    for key, task in (("eval/a", "a"), ("eval/c", "c"), ("eval/x", None)):
        det.note_eval(key, "max", task=task)
    found = []
    for i, (a, c) in enumerate([(0.8, 0.6), (0.82, 0.62), (0.81, 0.61), (0.8, 0.6)]):
        found += det.update(_obs(10 * i + 9, 0.0, a=a, c=c, x=c))
    for i, (a, c) in enumerate([(0.3, 0.2), (0.35, 0.2)]):
        found += det.update(_obs(40 + 10 * i + 9, 1.0, a=a, c=c, x=c))
    # a: trained in phase a -> gap; c: its phase has not come -> skipped; x: no task -> judged as before
    assert sorted((f.signal, f.step) for f in found) == [("eval/a", 59), ("eval/x", 59)]
    restored = StabilityGapDetector()
    restored.load_state_dict(det.state_dict())
    assert restored.state_dict() == det.state_dict()
