"""What a run records about itself: versions, git SHA, hardware."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

import keel


def git_sha(cwd: str | None = None) -> str | None:
    """The current commit of the working directory's repository, or None outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def describe_environment() -> dict[str, Any]:
    """Versions, git SHA, host and accelerators, for a run's metadata."""
    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "keel": keel.__version__,
        },
        "git_sha": git_sha(),
        "hardware": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        },
        "argv": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
