"""The device gate: skip a step's update on the device, without reading anything to the host first.

Under ``Guard(sync="deferred")`` the step's measurements travel to the host while the next step runs, so the
host decides one step late. The decisions that cannot wait — skipping the update of a step whose loss or
gradient norm is non-finite, or a critical spike — are taken on the device instead: a 0/1 tensor computed from
the step's own loss and gradient norm against limits the host's detectors set one step ahead
(`SpikeDetector.critical_above`), handed to the optimizer as ``found_inf`` — the argument through which
PyTorch's fused Adam, AdamW and SGD (and `torch.amp.GradScaler`) skip an update in their kernel, leaving the
parameters and the optimizer state as they were. Exactly the updates the host path skips are skipped.

Reference: ``torch/optim/adam.py`` (``_fused_adam``: ``found_inf`` and the step count it restores),
``torch/amp/grad_scaler.py`` (``_step_supports_amp_scaling``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from keel._core import keys
from keel.detect import Detector, SpikeDetector

GATED_SIGNALS = (keys.LOSS, keys.GRAD_NORM)


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips its update on a ``found_inf`` tensor (PyTorch's fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        getattr(optimizer, "defaults", {}).get("fused")
    )


class DeviceGate:
    """The skip verdict of a step, computed on the device from its loss and gradient norm.

    Args:
        detectors: The Guard's detectors; the spike detectors of the loss and the gradient norm set the limits.

    Example:
        >>> gate = DeviceGate([])
        >>> gate.verdict({"loss": torch.tensor(float("nan")), "grad/norm": torch.tensor(1.0)}).item()
        1.0
    """

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.spikes = [d for d in detectors if isinstance(d, SpikeDetector) and d.config.signal in GATED_SIGNALS]
        self.limits: dict[str, float] = {}

    def set_limits(self, step: int) -> None:
        """Take the spike detectors' critical limits for ``step`` (after they read the step before it)."""
        self.limits = {}
        for det in self.spikes:
            limit = det.critical_above(step)
            if math.isfinite(limit):
                signal = det.config.signal
                self.limits[signal] = min(limit, self.limits.get(signal, math.inf))

    def verdict(self, measured: dict[str, Tensor]) -> Tensor:
        """1.0 (skip) or 0.0, a float32 tensor on the measurements' device; nothing is read to the host."""
        present = [(key, measured[key]) for key in GATED_SIGNALS if key in measured]
        if not present:
            raise ValueError(f"the device gate needs {' or '.join(GATED_SIGNALS)} among the measurements")
        bad = torch.zeros((), dtype=torch.bool, device=present[0][1].device)
        for key, value in present:
            value = value.detach().reshape(()).to(torch.float64)
            bad = bad | ~torch.isfinite(value)
            if key in self.limits:
                bad = bad | (value >= self.limits[key])
        return bad.to(torch.float32)


def step_gated(optimizer: torch.optim.Optimizer, verdict: Tensor) -> None:
    """``optimizer.step()``, skipped inside the kernel where ``verdict`` is 1 (see the module docstring)."""
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    optimizer.found_inf = verdict  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
