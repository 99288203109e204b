"""Batch scans: a detector of one signal judges a whole series at once, exactly as step by step.

Two contracts let a driver of long logs (`keel doctor`) skip work without changing a finding:

- `SignalScan` — ``scan(steps, values)`` over one signal's series (below).
- `ReadsKeys` — the detector names the keys it reads, and promises that an observation holding none of them
  changes nothing; with ``rests_when_finite`` also that one whose read values are all finite leaves it at rest
  (no findings, and a state that no longer depends on what came before), so of a quiet stretch only one
  observation needs reading.

`keel doctor` reads logs of millions of steps; calling ``update`` once per step costs microseconds of Python
each. A detector that reads one scalar signal may also offer ``scan(steps, values)``: the findings ``update``
would return for ``Observation(step=steps[i], values={signal: values[i]})``, i = 0, 1, …, in order, leaving
the detector in the same state (``state_dict`` equal), so a scan can be cut anywhere — at a restart, a
checkpoint — and continued with ``update`` or another ``scan``. A NaN value stands for "not logged" as well
as a logged NaN: to these detectors both change nothing, so a log's missing steps may also be left out.

Example:
    >>> import numpy as np
    >>> from keel.detect import SpikeDetector
    >>> det = SpikeDetector(signal="loss")
    >>> isinstance(det, SignalScan)
    True
    >>> values = 2.0 + 0.01 * (np.arange(400) % 3)
    >>> values[300] = 8.0
    >>> [(f.step, f.severity) for f in det.scan(np.arange(400), values)]
    [(300, 'critical')]
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from keel._core.finding import Finding

SCAN_CHUNK, SCAN_CHUNK_MAX = 4096, 1 << 16  # values judged in bulk at once (doubling while nothing happens)


@runtime_checkable
class SignalScan(Protocol):
    """A detector of one signal (``config.signal``) that can judge a whole series of it at once."""

    config: Any

    def scan(self, steps: np.ndarray, values: np.ndarray) -> list[Finding]: ...


@runtime_checkable
class ReadsKeys(Protocol):
    """A detector that reads only ``reads``: value keys (``"loss"``) and per-parameter families (``"grad/norm/"``).

    ``update`` on an observation that holds none of them returns ``[]`` and leaves the state as it was, unless
    ``rests_when_finite``: then an observation whose read values are all finite (or absent) returns ``[]`` and
    leaves the detector at rest, in the state any such observation leaves it in. Other keys may be read for
    a finding's evidence, once one of ``reads`` woke it.
    """

    reads: tuple[str, ...]
    rests_when_finite: bool


class ReadsOneSignal:
    """`ReadsKeys` for a detector of ``config.signal`` alone: nothing but that signal wakes it."""

    config: Any
    rests_when_finite = False

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.config.signal,)


def as_series(steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` and ``values`` as int64 and float64 arrays of one length, or one clear error.

    Example:
        >>> as_series([0, 1], [2.0, float("nan")])
        (array([0, 1]), array([ 2., nan]))
    """
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    if steps.ndim != 1 or values.shape != steps.shape:
        raise ValueError(
            f"scan(steps, values): shapes {steps.shape} and {values.shape}; allowed: two 1-d arrays of one length"
        )
    if len(steps) and not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"scan(steps, values): steps of dtype {steps.dtype}; allowed: integers")
    return steps.astype(np.int64, copy=False), values
