"""A recipe whose runs kill their worker process (SIGKILL, as the out-of-memory killer does).

In its own module so that spawned pool workers can import it when they unpickle the run.
"""

import dataclasses
import os
import signal

from keel.proxy.trainer import TrainConfig


def _kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillsItsWorker(TrainConfig):
    """A `TrainConfig` that kills the process it is unpickled in: a worker dies before its run trains."""

    def __reduce__(self):
        return _kill_this_process, ()


def kills_its_worker(base: TrainConfig) -> TrainConfig:
    return KillsItsWorker(**dataclasses.asdict(base))


def _kill_this_process_the_first_time(marker: str, fields: dict) -> TrainConfig:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return TrainConfig(**fields)


class KillsItsFirstWorker(TrainConfig):
    """A `TrainConfig` that kills the first process it is unpickled in (``marker`` absent), then unpickles as itself:
    a worker lost once, as to a spot instance or another job's memory."""

    marker = ""

    def __reduce__(self):
        return _kill_this_process_the_first_time, (self.marker, dataclasses.asdict(self))


def kills_its_first_worker(marker: str):
    """A recipe whose run's first worker dies (``marker``: a file path that does not exist yet)."""

    def kills_its_first_worker(base: TrainConfig) -> TrainConfig:
        config = KillsItsFirstWorker(**dataclasses.asdict(base))
        config.marker = marker
        return config

    return kills_its_first_worker
