"""RunEnd: a run whose process ends before ``Guard.close()`` still keeps what keel saw, and says how it ended.

Real runs end badly: a scheduler preempts them (SLURM and Kubernetes send SIGTERM, then SIGKILL after a grace
period), a user hits Ctrl-C (SIGINT), an exception or ``sys.exit`` leaves the loop, the OOM killer sends SIGKILL.
Without this the run store keeps the batches its writer thread committed — up to ``flush_interval`` (0.5 s) of
rows are lost with the queue — and says ``status: running`` for ever.

While a Guard with a run_dir is open:

- on SIGTERM or SIGINT, its store gets ``status: interrupted by SIGTERM after N steps`` (and an ``interrupted``
  entry) and is flushed, then the handler installed before keel's runs — Python's default, the user's,
  Lightning's or accelerate's — so the process ends (or goes on) exactly as it would have without keel. A handler
  set to ignore the signal stays ignored; the default action (termination by the signal) is re-raised.
- when the interpreter exits with the Guard still open (an uncaught exception, ``sys.exit``, the end of a
  script without ``close()``), ``atexit`` closes it: late signals, disk snapshots in flight, the diagnosis and
  the final status (``failed: <exception>`` or ``exited without Guard.close()``) are written.

SIGKILL cannot be caught: a killed run loses the rows of at most its last ``flush_interval`` (0.5 s), and its
status stays ``running``. Handlers can only be installed from the main thread; a Guard built in another thread
gets the ``atexit`` part only. One process-wide handler serves every open Guard (no chain that grows with each
Guard), and the handler that was there before is put back when the last one closes, unless someone replaced
keel's in the meantime (theirs is left in place; keel's then only passes the signal on). A Guard opened while
another handler is in place installs keel's over it again.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from keel._core.errors import KeelWarning

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXITED = "exited without Guard.close()"

_lock = threading.RLock()
_open: weakref.WeakSet[RunEnd] = weakref.WeakSet()  # a Guard dropped without close() stops being called
# The handlers keel's replaced, oldest first: one more each time keel's is installed over a handler that chains to it
# (a framework that installed its own over keel's, calling keel's in turn); the n-th nested call of keel's passes the
# signal on to the n-th newest, so a chain through keel's twice ends at the handler that was there first, not a loop.
_before: dict[int, list[Any]] = {}
_depth: dict[int, int] = {}  # nested calls of keel's handler in progress, per signal (main thread only)
_atexit_registered = False
# The process whose Guards these are: a forked child (os.fork, a fork-started worker) inherits the handler and the open
# Guards but not their writer threads, so there keel's handler only passes the signal on and records nothing.
_owner_pid = os.getpid()


class RunEnd:
    """One open Guard's watch over how its process ends; `close` (at ``Guard.close``) ends it.

    Args:
        on_signal: Called with the signal's name (``"SIGTERM"``) when one arrives, before it is passed on.
        on_exit: Called with the run's final status when the interpreter exits with the Guard still open.

    Example:
        >>> seen = []
        >>> end = RunEnd(on_signal=seen.append, on_exit=seen.append)
        >>> end.close()
        >>> seen
        []
    """

    def __init__(self, *, on_signal: Callable[[str], None], on_exit: Callable[[str], None]) -> None:
        self.on_signal, self.on_exit = on_signal, on_exit
        global _atexit_registered
        with _lock:
            global _owner_pid
            if _owner_pid != os.getpid():  # a Guard opened in a forked child: the open ones are its parent's
                _open.clear()
                _owner_pid = os.getpid()
            _open.add(self)
            if not _atexit_registered:
                atexit.register(_at_exit)
                _atexit_registered = True
            _install()

    def close(self) -> None:
        """Stop watching (safe to call twice); the last open one puts the earlier signal handlers back."""
        with _lock:
            _open.discard(self)
            if not _open:
                _uninstall()


def exit_status() -> str:
    """The status of a run whose interpreter exits with its Guard open: the uncaught exception, if any."""
    exc = getattr(sys, "last_value", None)  # set when an exception reached the top level
    if isinstance(exc, BaseException):
        return f"failed: {type(exc).__name__}: {exc}"
    return EXITED


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal raises off the main thread
    for sig in SIGNALS:
        if signal.getsignal(sig) is _handle:
            continue
        try:
            before = signal.signal(sig, _handle)
        except (ValueError, OSError):  # an embedding interpreter may refuse: the atexit part still works
            continue
        _before.setdefault(sig, []).append(before)


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # keel's handler stays, passing signals on; the next close from the main thread restores
    for sig, stack in _before.items():
        # Put back only where keel's is still the handler: where another replaced it (and may call it), keel's stays
        # in that chain, passing the signal on; so does one replaced from outside Python (None: cannot be put back).
        if stack and signal.getsignal(sig) is _handle and stack[-1] is not None:
            signal.signal(sig, stack.pop())


def _handle(signum: int, frame: FrameType | None) -> None:
    """Record the signal in every open run's store, then do what the handler before keel's would have done."""
    depth = _depth.get(signum, 0)
    if depth == 0 and os.getpid() == _owner_pid:  # the first call (a chain back through keel's records nothing
        # twice), in the process that opened the Guards
        name = signal.Signals(signum).name
        with _lock:
            watching = list(_open)
        for end in watching:
            try:
                end.on_signal(name)
            except Exception as exc:  # never let keel's bookkeeping swallow or change the signal
                warnings.warn(f"keel: recording {name} failed ({type(exc).__name__}: {exc})", KeelWarning, stacklevel=2)
    stack = _before.get(signum, [])
    before = stack[-1 - depth] if depth < len(stack) else signal.SIG_DFL
    if callable(before):
        _depth[signum] = depth + 1
        try:
            before(signum, frame)  # Python's default SIGINT handler raises KeyboardInterrupt here
        finally:
            _depth[signum] = depth
    elif before != signal.SIG_IGN:  # the default action (or one set outside Python): end as without keel
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _at_exit() -> None:
    if os.getpid() != _owner_pid:
        return  # a forked child exiting: the open Guards are its parent's
    with _lock:
        watching = list(_open)
    status = exit_status()
    for end in watching:
        try:
            end.on_exit(status)
        except Exception as exc:
            warnings.warn(
                f"keel: closing an open Guard at exit failed ({type(exc).__name__}: {exc})", KeelWarning, stacklevel=1
            )
