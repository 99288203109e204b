"""A training job run in a forked child that may SIGKILL itself (a preempted job), for same-command restart tests."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from pathlib import Path


def run_forked(out: Path, job: Callable[[], None]) -> int:
    """``job()`` in a forked child, keel's console lines written to ``out/console.log`` (the child's logging is its
    own); the signal that ended it (SIGKILL: preempted), or its exit code. An exception in the child fails the test
    with the child's traceback."""
    out.mkdir(exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            logging.getLogger("keel").addHandler(logging.FileHandler(out / "console.log"))
            job()
        except BaseException:
            (out / "error.txt").write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert not (out / "error.txt").exists(), (out / "error.txt").read_text()
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
