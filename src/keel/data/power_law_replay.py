"""PowerLawReplay: a sampler over a stream of tasks that rehearses earlier tasks by a power law of their age.

In natural environments the chance of meeting a task again falls as a power of the time since it was last met
(Anderson & Schooler 1991, "Reflections of the environment in memory"); Gandhi, Shah, Marupudi & Varma (2024,
"Catastrophic interference is mitigated in naturalistic power-law learning environments", arXiv 2401.10393) train
on task streams whose rehearsal follows that law and find it mitigates forgetting. Their exact exponent and time
unit are not confirmed here (no code found); keel implements this schedule:

    a stream of tasks 0 … T−1, ``samples_per_task`` indices each, task j's phase at positions
    [j·S, (j+1)·S). At position t of task j's phase, each index is a replay index with probability
    ``replay_fraction`` (j ≥ 1), else the next of task j's own examples (shuffled, cycling). A replay index
    comes from earlier task i < j with probability

        p_i(t) = age_i(t)^(−α) / Σ_{k<j} age_k(t)^(−α),   age_i(t) = t − (i+1)·S + 1

    (the age in samples since task i's phase ended, ≥ 1), and is one of task i's examples drawn uniformly.

``exponent`` α = 0 is uniform replay over earlier tasks, the usual baseline; α = 1 is Anderson & Schooler's
order. The law is scale-free: measuring age in batches instead of samples changes the weights only through the +1.

Example:
    >>> sampler = PowerLawReplay([range(0, 4), range(4, 8)], samples_per_task=4, replay_fraction=0.5, seed=0)
    >>> len(list(sampler))
    8
    >>> sampler.task_probabilities(6)  # in task 1's phase: half replay, all of it from task 0
    [0.5, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np


class PowerLawReplay:
    """Index sampler for a ``DataLoader``: task after task, with power-law rehearsal of earlier tasks.

    Args:
        tasks: Each task's example indices in the dataset (a range, a list), in the order the tasks are learnt.
        samples_per_task: Indices drawn during each task's phase.
        replay_fraction: Share of a phase's indices that rehearse earlier tasks, in [0, 1).
        exponent: α of the power law, >= 0 (0: uniform over earlier tasks).
        seed: Seed of every draw (the same seed gives the same stream).

    Raises:
        ValueError: A task is empty or holds a negative index, or an argument is out of range; the message
            names it and what is allowed.

    Example:
        ``DataLoader(dataset, batch_size=32, sampler=PowerLawReplay(task_indices, samples_per_task=6400))``
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[int]],
        *,
        samples_per_task: int,
        replay_fraction: float = 0.25,
        exponent: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.tasks = [np.asarray(list(t), dtype=np.int64) for t in tasks]
        if not self.tasks or any(t.size == 0 or (t < 0).any() for t in self.tasks):
            raise ValueError("PowerLawReplay tasks: allowed: one or more non-empty sequences of indices >= 0")
        if isinstance(samples_per_task, bool) or not isinstance(samples_per_task, int) or samples_per_task < 1:
            raise ValueError(f"PowerLawReplay samples_per_task={samples_per_task!r}; allowed: an int >= 1")
        if not _number(replay_fraction) or not 0.0 <= replay_fraction < 1.0:
            raise ValueError(f"PowerLawReplay replay_fraction={replay_fraction!r}; allowed: a number in [0, 1)")
        if not _number(exponent) or not 0.0 <= exponent < math.inf:
            raise ValueError(f"PowerLawReplay exponent={exponent!r}; allowed: a finite number >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"PowerLawReplay seed={seed!r}; allowed: an int >= 0")
        self.samples_per_task = samples_per_task
        self.replay_fraction = float(replay_fraction)
        self.exponent = float(exponent)
        self.seed = seed
        self.position = 0  # indices handed out in this pass over the stream (a DataLoader fetches a few ahead)
        self._resume_at = 0

    def state_dict(self) -> dict[str, int]:
        """The position in the stream: ``guard.track(sampler)`` keeps it, so a resumed run continues the stream
        (the same seed draws the same stream; the indices already handed out are drawn again and passed over).

        It counts the indices handed out: a ``DataLoader`` with workers fetches ``num_workers × prefetch_factor``
        batches ahead of training, and a resume passes over those (use ``num_workers=0`` for an exact resume)."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = state.get("position") if isinstance(state, dict) else None
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= len(self):
            raise ValueError(f"PowerLawReplay state {state!r}; allowed: {{'position': an int in [0, {len(self)}]}}")
        self.position = self._resume_at = position

    def __len__(self) -> int:
        return len(self.tasks) * self.samples_per_task

    def task_probabilities(self, position: int) -> list[float]:
        """The probability that the index at stream ``position`` comes from each task (0 for later tasks).

        Raises:
            ValueError: ``position`` is outside the stream.
        """
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(self):
            raise ValueError(f"PowerLawReplay position={position!r}; allowed: an int in [0, {len(self)})")
        current = position // self.samples_per_task
        probabilities = [0.0] * len(self.tasks)
        if current == 0:
            probabilities[0] = 1.0
            return probabilities
        replay = self.replay_weights(position)
        for task, weight in enumerate(replay):
            probabilities[task] = self.replay_fraction * weight
        probabilities[current] = 1.0 - self.replay_fraction
        return probabilities

    def replay_weights(self, position: int) -> list[float]:
        """p_i(t) of the module's formula for each earlier task i at stream ``position`` (empty in task 0)."""
        current = position // self.samples_per_task
        ages = np.array([position - (i + 1) * self.samples_per_task + 1 for i in range(current)], dtype=np.float64)
        weights = ages**-self.exponent
        return (weights / weights.sum()).tolist() if current else []

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        self.position = start
        for n, index in enumerate(self._stream()):
            if n >= start:
                self.position = n + 1
                yield index

    def _stream(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        for current, own in enumerate(self.tasks):
            order, drawn = rng.permutation(own), 0
            for offset in range(self.samples_per_task):
                position = current * self.samples_per_task + offset
                if current and rng.random() < self.replay_fraction:
                    cumulative = np.cumsum(self.replay_weights(position))
                    task = min(
                        int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), current - 1
                    )
                    yield int(self.tasks[task][rng.integers(self.tasks[task].size)])
                else:
                    if drawn and drawn % own.size == 0:  # a new pass over the task's examples
                        order = rng.permutation(own)
                    yield int(order[drawn % own.size])
                    drawn += 1


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


__all__ = ["PowerLawReplay"]
