"""How an argument error names the value it refuses: a tensor by dtype and shape, anything else by a short repr."""

from __future__ import annotations

from torch import Tensor


def describe(value: object) -> str:
    """A short description of ``value`` for an error message.

    Example:
        >>> import torch
        >>> describe(torch.zeros(2, 3)), describe([1, 2])
        ('a torch.float32 tensor of shape (2, 3)', '[1, 2]')
    """
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
