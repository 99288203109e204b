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
