"""Continual-learning runs on synthetic classes: what the task-switch and noisy-eval scenarios share.

A class-incremental stream in the style of Split-MNIST (De Lange et al. 2023, arXiv 2205.13452; seed-catalog
T14), small enough for a CPU test and with nothing to download: four Gaussian classes in 32 dimensions (one
random mean per class and seed, isotropic noise), task A = classes 0 and 1, task B = classes 2 and 3, one shared
four-way head. An MLP (32 → 64 → 4) trains with SGD and momentum; on task B each batch mixes new examples with
replayed ones from a fixed memory of task A (experience replay, the paper's ER baseline).

The stability gap: at the switch the new classes' loss is large, its gradient (carried on by momentum) pushes
the head towards classes 2 and 3 and task A's held-out accuracy collapses within a few steps; the replayed
examples then pull it back to near its level before the switch. The scenario records both tasks' held-out
accuracy with `Guard.evaluate` (``task=`` naming the phase each measures) and the switch with `Guard.phase`,
as a user's loop would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints, require_positive
from keel.guard import Guard
from keel.harness.scenarios._common import ScenarioResult

DIM, HIDDEN, CLASSES = 32, 64, 4
TASKS = {"A": (0, 1), "B": (2, 3)}
SEPARATION = 3.0  # the class means' norm, in units of the noise when noise = 1
MEMORY = 200  # task-A examples kept for replay
DATA_SEED_OFFSET = 1009  # the data's generator, apart from the model's initialisation (torch.manual_seed(seed))


@dataclass(kw_only=True)
class ContinualConfig:
    """One run of the synthetic class-incremental stream.

    Attributes:
        steps: Optimizer steps in all.
        switch_step: The first step trained on task B; ``None``: one phase, task A throughout.
        lr: SGD learning rate.
        momentum: SGD momentum (0.9 makes the gap deep; without momentum it is shallow).
        batch_size: Examples per step.
        replay: Of those, how many come from task A's memory once task B trains.
        noise: Standard deviation of each class around its mean (class means are standard normal).
        eval_every: Steps between held-out evaluations (`Guard.evaluate`'s ``every``).
        eval_examples: Held-out examples per task and evaluation.
        eval_resample: Draw a fresh held-out subsample at every evaluation (noisy evals) instead of a fixed set.
        seed: Seeds the model's initialisation and the data.
    """

    steps: int = 400
    switch_step: int | None = 150
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 32
    replay: int = 16
    noise: float = 1.0
    eval_every: int = 2
    eval_examples: int = 500
    eval_resample: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "steps", "batch_size", "eval_every", "eval_examples")
        require_ints(self, "replay", "seed", minimum=0)
        require_positive(self, "lr", "noise")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"ContinualConfig.momentum={self.momentum!r}; allowed: 0 <= momentum < 1")
        if self.replay >= self.batch_size:
            raise ValueError(
                f"ContinualConfig.replay={self.replay!r}; allowed: fewer than batch_size={self.batch_size}"
            )
        if self.switch_step is not None and not (
            isinstance(self.switch_step, int) and 0 < self.switch_step < self.steps
        ):
            raise ValueError(
                f"ContinualConfig.switch_step={self.switch_step!r}; allowed: None or an int in 1..{self.steps - 1}"
            )


@dataclass
class ContinualResult(ScenarioResult):
    """A scenario result with the held-out evaluations: ``evals[task]`` is a list of (step, accuracy)."""

    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class GaussianClasses:
    """Four Gaussian classes, reproducible from a seed: ``sample(classes, n)`` → inputs (n, 32), labels (n,)."""

    def __init__(self, seed: int, noise: float) -> None:
        self.generator = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
        # orthogonal class means of one norm: every pair of classes equally far apart, the same difficulty at
        # every seed (with free random means some seeds separate perfectly and the loss falls to ~1e-4)
        q, _ = torch.linalg.qr(torch.randn(DIM, CLASSES, generator=self.generator))
        self.means = SEPARATION * q.T
        self.noise = noise

    def sample(
        self, classes: tuple[int, ...], n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        g = self.generator if generator is None else generator
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        return self.means[y] + self.noise * torch.randn(n, DIM, generator=g), y


def build_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def train_continual(
    config: ContinualConfig, *, name: str, run_dir: str | None = None, event_step: int | None = None
) -> ContinualResult:
    """Train ``config`` under ``Guard(policy="observe")`` with keel's default probes and detectors, on one thread.

    The phase is ``"A"`` from step 0 and ``"B"`` from ``switch_step``; ``eval/A`` and ``eval/B`` (held-out
    accuracy, ``task=`` the phase each measures, goal ``"max"``) run every ``eval_every`` steps, ``eval/B`` only
    in a two-phase run.
    """
    data = GaussianClasses(config.seed, config.noise)
    model = build_classifier(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    memory = data.sample(TASKS["A"], MEMORY)
    held_out = {task: data.sample(classes, config.eval_examples) for task, classes in TASKS.items()}
    eval_generator = torch.Generator().manual_seed(config.seed + 2 * DATA_SEED_OFFSET)
    evals: dict[str, list[tuple[int, float]]] = {}
    step = 0

    def accuracy(task: str):  # type: ignore[no-untyped-def]
        def fn(m: nn.Module) -> float:
            if config.eval_resample:  # a fresh subsample each time: the eval itself is noisy
                x, y = data.sample(TASKS[task], config.eval_examples, eval_generator)
            else:
                x, y = held_out[task]
            value = (m(x).argmax(dim=1) == y).float().mean().item()
            evals.setdefault(task, []).append((step, value))
            return value

        return fn

    tasks = ["A"] if config.switch_step is None else ["A", "B"]
    guard = Guard(model, optimizer, run_dir=run_dir, policy="observe", seed=config.seed)
    guard.phase("A")
    for task in tasks:
        guard.evaluate(task, accuracy(task), every=config.eval_every, task=task, goal="max")
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-64-4 MLP: a second intra-op thread only adds contention (4x slower, measured)
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            if config.switch_step is not None and step == config.switch_step:
                guard.phase("B")
            x, y = _batch(config, data, memory, step)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        guard.close()
        torch.set_num_threads(threads)
    findings: list[Finding] = list(guard.findings)
    return ContinualResult(
        name=name,
        losses=losses,
        findings=findings,
        wall_s=time.perf_counter() - start,
        event_step=event_step,
        evals=evals,
    )


def _batch(
    config: ContinualConfig, data: GaussianClasses, memory: tuple[Tensor, Tensor], step: int
) -> tuple[Tensor, Tensor]:
    if config.switch_step is None or step < config.switch_step:
        return data.sample(TASKS["A"], config.batch_size)
    x, y = data.sample(TASKS["B"], config.batch_size - config.replay)
    pick = torch.randint(MEMORY, (config.replay,), generator=data.generator)
    return torch.cat([x, memory[0][pick]]), torch.cat([y, memory[1][pick]])
