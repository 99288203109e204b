"""The ``stacklevel`` that makes a warning raised deep inside keel name the user's line."""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType

import torch

_INSIDE = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))  # keel's and torch's files


def loop_stacklevel() -> int:
    """For ``warnings.warn(..., stacklevel=loop_stacklevel())``: the first frame outside keel and torch.

    The depth from a keel warning to the loop's line varies (a hooked ``backward()`` runs through one gate per open
    watch, ``scaler.step`` through torch's GradScaler, ``Guard.step`` through ``torch.compiler.disable``'s wrapper
    once ``torch._dynamo`` is imported), so no fixed number is right.

    Called in the argument list of a ``warnings.warn`` made by a keel function (level 1, inside keel), it walks out
    from level 2 past keel's and torch's frames.
    """
    frame: FrameType | None = sys._getframe(2)  # level 1 is the function calling warnings.warn
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
