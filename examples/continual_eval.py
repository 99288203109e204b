"""Continual evaluation with keel: evals on a schedule, a task switch, the stability gap found and measured.

    python examples/continual_eval.py --out runs/continual
    keel report runs/continual

A small MLP learns task a (classes 0 and 1), then switches to task b (classes 2 and 3) while replaying a few
remembered examples of task a (experience replay, 4 of every 32). ``guard.evaluate`` measures both tasks' held-out
accuracy every 2 steps, ``guard.phase("b")`` marks the switch. Right after it, task a's accuracy collapses and then
climbs back most of the way: keel's stability-gap detector warns at the first eval in the gap (depth, steps after
the switch) and records the recovery later; the continual metrics (min-ACC, WC-ACC, windowed forgetting, BWT) are
recomputed after each eval round. Everything is in the run store in ``--out``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.store import RunReader

DIM, NOISE = 20, 1.5


def sample(centers: torch.Tensor, classes: list[int], n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` points of ``classes``, each a Gaussian blob around its centre."""
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
    return centers[y] + NOISE * torch.randn(n, DIM, generator=gen), y


def accuracy(x: torch.Tensor, y: torch.Tensor):
    return lambda model: (model(x).argmax(1) == y).float().mean()  # keel runs it under no_grad, in eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/continual", help="run directory (the run store goes here)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(4, DIM, generator=gen)
    test_a, test_b = sample(centers, [0, 1], 300, gen), sample(centers, [2, 3], 300, gen)
    memory = sample(centers, [0, 1], 200, gen)  # the replay buffer: examples of task a kept for later
    model = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)

    guard = keel.Guard(model, optimizer, run_dir=args.out, policy="observe", overwrite=True)
    guard.phase("a")
    guard.evaluate("a", accuracy(*test_a), every=2, task="a")
    guard.evaluate("b", accuracy(*test_b), every=2, task="b")
    for step in range(2 * args.steps):
        if step == args.steps:
            guard.phase("b")  # from the next step on, the loop trains on task b
        if step < args.steps:
            x, y = sample(centers, [0, 1], 32, gen)
        else:
            xb, yb = sample(centers, [2, 3], 28, gen)
            replay = torch.randint(len(memory[1]), (4,), generator=gen)
            x, y = torch.cat([xb, memory[0][replay]]), torch.cat([yb, memory[1][replay]])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        optimizer.zero_grad(set_to_none=True)
    guard.close()

    with RunReader(args.out) as store:
        for f in store.findings():
            if f.kind == "stability_gap":
                ev = f.evidence
                print(
                    f"step {f.step}: stability_gap {f.severity}: {ev['eval']} {ev['value_before']:.2f} → "
                    f"{ev['minimum']:.2f} (depth {ev['depth']:.2f}, {ev['steps_after_switch']} steps after the switch)"
                    + (f", half recovered {ev['recovery_steps']} steps after it" if f.severity == "info" else "")
                )
        for key in ("min_acc", "wc_acc", "wf/10", "forgetting", "bwt"):
            steps, values = store.signal(f"continual/{key}")
            if len(values):
                print(f"continual/{key} = {values[-1]:.3f} (step {steps[-1]})")


if __name__ == "__main__":
    main()
