"""A run whose process ends before Guard.close() keeps its rows and says how it ended (`keel.guard.run_end`).

The fast tests send the signal to this process with a Python handler of the test's own in place (so pytest is
never ended); the slow ones end a real training loop in a child process (tests/guard/_killed_run.py) with
SIGTERM, SIGINT, an exception and sys.exit, and read its store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keel import Guard, RecoveryConfig
from keel.doctor import examine_log, format_result
from keel.guard import run_end
from keel.store import RunReader, RunWriter
from tests.conftest import TinyNet, make_batches

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_sigterm():
    """A SIGTERM handler of the test's own (records the call; never ends pytest), put back afterwards."""
    calls: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGTERM, before)


def _train(guard: Guard, model: TinyNet, opt: torch.optim.Optimizer, steps: int) -> None:
    for x, y in make_batches(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()


def _guard(run_dir: Path, **kwargs) -> tuple[Guard, TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Guard(model, opt, run_dir=str(run_dir), **kwargs), model, opt


def _committed(run_dir: Path) -> tuple[list[int], dict]:
    """What another process would read now: the loss steps and the meta committed to the store."""
    with RunReader(run_dir / "run.sqlite") as store:
        return [int(s) for s in store.signal("loss")[0]], store.meta()


# --- fast, in this process ------------------------------------------------------------------------------------
def test_sigterm_flushes_the_store_says_so_and_calls_the_handler_installed_before(tmp_path, own_sigterm):
    guard, model, opt = _guard(tmp_path)
    _train(guard, model, opt, 3)
    os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the next bytecode
    steps, meta = _committed(tmp_path)  # before close: the handler committed everything
    assert steps == [0, 1, 2]
    assert meta["status"] == "interrupted by SIGTERM after 3 steps" and meta["steps"] == 3
    assert own_sigterm == [signal.SIGTERM]  # passed on once, to the handler that was there before
    guard.close()
    assert signal.getsignal(signal.SIGTERM) is not run_end._handle  # the test's own is back
    _, meta = _committed(tmp_path)
    assert meta["status"] == "interrupted by SIGTERM after 3 steps"  # the signal is what ended it


def test_close_puts_back_the_handlers_that_were_there_so_pytest_keeps_its_own(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in run_end.SIGNALS}
    guard, _, _ = _guard(tmp_path)
    assert all(signal.getsignal(sig) is run_end._handle for sig in run_end.SIGNALS)
    guard.close()
    assert {sig: signal.getsignal(sig) for sig in run_end.SIGNALS} == before


def test_two_open_guards_share_one_handler_and_both_record_the_signal(tmp_path, own_sigterm):
    first, second = _guard(tmp_path / "a")[0], _guard(tmp_path / "b")[0]
    os.kill(os.getpid(), signal.SIGTERM)
    assert own_sigterm == [signal.SIGTERM]  # one handler, not a chain through each Guard
    first.close()  # not the last one open: the handler stays for the second
    assert signal.getsignal(signal.SIGTERM) is run_end._handle
    second.close()
    assert signal.getsignal(signal.SIGTERM) is not run_end._handle
    for folder in ("a", "b"):
        assert _committed(tmp_path / folder)[1]["status"] == "interrupted by SIGTERM after 0 steps"


def test_a_handler_installed_over_keels_is_left_in_place_at_close(tmp_path, own_sigterm):
    guard, _, _ = _guard(tmp_path)
    chained = signal.getsignal(signal.SIGTERM)
    theirs = lambda signum, frame: chained(signum, frame)  # noqa: E731 - a framework chaining to keel's
    signal.signal(signal.SIGTERM, theirs)
    guard.close()
    assert signal.getsignal(signal.SIGTERM) is theirs
    os.kill(os.getpid(), signal.SIGTERM)  # keel's, still in their chain, passes it on to the one before it
    assert own_sigterm == [signal.SIGTERM]


def test_flush_on_exit_false_installs_nothing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    guard, _, _ = _guard(tmp_path, flush_on_exit=False)
    assert signal.getsignal(signal.SIGTERM) is before and guard._end is None
    guard.close()


def test_a_guard_built_off_the_main_thread_installs_no_handler_and_still_closes_at_exit(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    built: list[Guard] = []
    thread = threading.Thread(target=lambda: built.append(_guard(tmp_path)[0]))
    thread.start()
    thread.join()
    assert built and signal.getsignal(signal.SIGTERM) is before
    run_end._at_exit()  # what atexit runs
    assert _committed(tmp_path)[1]["status"] == "exited without Guard.close()"


def test_at_exit_an_open_guard_is_closed_with_its_rows_and_how_it_ended(tmp_path):
    guard, model, opt = _guard(tmp_path)
    _train(guard, model, opt, 4)
    run_end._at_exit()
    steps, meta = _committed(tmp_path)
    assert steps == [0, 1, 2, 3] and meta["status"] == "exited without Guard.close()" and meta["steps"] == 4
    assert guard._closed and signal.getsignal(signal.SIGTERM) is not run_end._handle


def test_exit_status_names_the_uncaught_exception(monkeypatch):
    monkeypatch.setattr(sys, "last_value", RuntimeError("the loop failed"), raising=False)
    assert run_end.exit_status() == "failed: RuntimeError: the loop failed"
    monkeypatch.delattr(sys, "last_value")
    assert run_end.exit_status() == run_end.EXITED


def test_writer_flush_after_close_returns_at_once_saying_all_is_committed(tmp_path):
    writer = RunWriter(tmp_path)
    writer.add_signals(0, {"loss": 1.0})
    writer.close()
    assert writer.flush(timeout=30.0) is True  # the thread is gone: no wait for it


# --- slow, a real child process ---------------------------------------------------------------------------------
def _child(run_dir: Path, steps: int, how: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.guard._killed_run", str(run_dir), str(steps), how, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end_at(run_dir: Path, step: int, how: str, sig: signal.Signals | None) -> int:
    """Run the loop to ``step``; send ``sig`` when it says it did that step (None: it ends itself there)."""
    child = _child(run_dir, step + 1 if sig is None else 10_000, how)
    if sig is not None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.split() == ["step", str(step)]:
                child.send_signal(sig)
                break
    child.communicate(timeout=120)
    return child.returncode


def _integrity(run_dir: Path) -> str:
    conn = sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "how,sig,returncode,status",
    [
        ("close", signal.SIGTERM, -signal.SIGTERM, "interrupted by SIGTERM after {n} steps"),
        ("close", signal.SIGINT, -signal.SIGINT, "interrupted by SIGINT after {n} steps"),
        ("with", signal.SIGINT, -signal.SIGINT, "interrupted by SIGINT after {n} steps"),
        ("raise", None, 1, "failed: RuntimeError: the loop failed"),
        ("exit", None, 3, "exited without Guard.close()"),
    ],
)
def test_a_run_ended_before_close_keeps_every_step_and_says_how_it_ended(tmp_path, how, sig, returncode, status):
    assert _end_at(tmp_path, 20, how, sig) == returncode  # the process ends exactly as it would without keel
    steps, meta = _committed(tmp_path)
    assert steps[-1] >= 20 and steps == list(range(len(steps)))  # nothing up to the step it ended at is lost
    # the signal lands while the loop runs on: {n} is the steps it had done then, each of them stored
    assert (meta["status"], meta["steps"]) == (status.format(n=len(steps)), len(steps))
    assert _integrity(tmp_path) == "ok"


@pytest.mark.slow
def test_a_sigterm_with_flush_on_exit_false_ends_the_process_as_before(tmp_path):
    child = _child(tmp_path, 10_000, "close", "no_handlers")
    assert child.stdout is not None
    for line in child.stdout:
        if line.split() == ["step", "3"]:
            child.send_signal(signal.SIGTERM)
            break
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGTERM
    assert _committed(tmp_path)[1].get("status", "running") == "running"  # nothing recorded it: the opt-out


@pytest.mark.slow
def test_a_preempted_run_resumes_with_one_contiguous_store(tmp_path):
    assert _end_at(tmp_path, 33, "close", signal.SIGTERM) == -signal.SIGTERM
    with RunReader(tmp_path / "run.sqlite") as store:
        newest = max(row["step"] for row in store.snapshots())
    resumed = _child(tmp_path, 50, "close", "resume")
    resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    steps, meta = _committed(tmp_path)
    assert steps == list(range(50)) and meta["status"] == "finished" and meta["resumed_from"] == newest


@pytest.mark.parametrize(
    "how,said",
    [
        ("signal", "the run was interrupted by SIGTERM after 3 steps (preempted or stopped: resume=True continues"),
        ("open", "the run's status is 'running': it is still running, or its process was killed"),
        ("close", None),
    ],
)
def test_keel_doctor_says_how_a_run_ended_when_it_did_not_finish(tmp_path, own_sigterm, how, said):
    guard, model, opt = _guard(tmp_path)
    _train(guard, model, opt, 3)
    if how == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        guard.recorder.writer.flush()
    text = format_result(examine_log(str(tmp_path)))  # while the Guard is open: as a killed run's store reads
    guard.close()
    if how != "open":
        text = format_result(examine_log(str(tmp_path)))
    lines = [line for line in text.splitlines() if line.startswith(("the run was", "the run's status"))]
    if said is None:
        assert lines == []  # a run that finished says nothing more
    else:  # the sentence may wrap at the terminal's width (narrower in a pytest-xdist worker)
        assert len(lines) == 1 and said in " ".join(text[text.index(lines[0]) :].split())


def test_a_resume_past_the_rows_a_sigkill_lost_says_which_steps_stay_missing(tmp_path):
    guard, model, opt = _guard(tmp_path, policy="recover", recovery=RecoveryConfig(snapshot_every=2, disk_every=1))
    for x, y in make_batches(8):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
        guard.recovery.disk.wait()  # every snapshot due is written: a busy disk tier skips one
    guard.close()
    with RunReader(tmp_path / "run.sqlite") as store:
        newest = max(row["step"] for row in store.snapshots())
    assert newest >= 4
    lost = newest - 2  # a SIGKILL lost the rows of the last steps; the disk snapshot of a later one survived
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    with conn:
        conn.execute("DELETE FROM signals WHERE step >= ?", (lost,))
        conn.execute("DELETE FROM meta WHERE key = 'steps'")
    conn.close()
    with pytest.warns(Warning, match=rf"the rows of steps {lost}–{newest - 1} were lost .* stay missing"):
        resumed, _, _ = _guard(tmp_path, policy="recover", resume=True)
    assert resumed.global_step == newest
    resumed.close()
    assert _committed(tmp_path)[1]["missing_steps"] == [lost, newest - 1]


def test_a_guard_opened_over_a_framework_handler_that_chains_to_keels_records_once_and_ends_at_the_first(
    tmp_path, own_sigterm
):
    first, _, _ = _guard(tmp_path / "a")
    keels = signal.getsignal(signal.SIGTERM)
    framework: list[int] = []

    def theirs(signum, frame):  # a framework's handler, installed over keel's and calling it in turn
        framework.append(signum)
        keels(signum, frame)

    signal.signal(signal.SIGTERM, theirs)
    second, _, _ = _guard(tmp_path / "b")  # keel's goes over theirs: both Guards must hear the signal
    assert signal.getsignal(signal.SIGTERM) is run_end._handle
    os.kill(os.getpid(), signal.SIGTERM)
    assert framework == [signal.SIGTERM] and own_sigterm == [signal.SIGTERM]  # each once: no loop
    second.close()
    assert signal.getsignal(signal.SIGTERM) is run_end._handle  # the first is still open
    first.close()
    assert signal.getsignal(signal.SIGTERM) is theirs  # the one keel's went over; it still chains to keel's
    os.kill(os.getpid(), signal.SIGTERM)
    assert framework == [signal.SIGTERM] * 2 and own_sigterm == [signal.SIGTERM] * 2
    for folder in ("a", "b"):
        assert _committed(tmp_path / folder)[1]["status"] == "interrupted by SIGTERM after 0 steps"


def test_a_forked_child_passes_a_signal_on_without_recording_into_its_parents_guard(tmp_path):
    """A forked child inherits keel's handler and the open Guard, not its writer thread: recording there waited out
    the 10 s flush before the child could die (review of session 10)."""
    # the handler keel's chains to is the default one, as in a plain script: a SIGTERM handler another test in this
    # process left (a framework's, which only sets a flag) made the child live on in pause() until the test timed out
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _forked_child_dies_by_sigterm(tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forked_child_dies_by_sigterm(tmp_path):
    guard, _, _ = _guard(tmp_path)
    marker = tmp_path / "recorded_in_child"
    guard._end.on_signal = lambda name: marker.write_text(name)  # what the child must not do
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say it is past the fork (a signal before that is lost), then wait for SIGTERM
        try:
            os.write(tell, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.read(ready, 1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    guard.close()
    os.close(ready), os.close(tell)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM  # it died by the signal, as without keel
    assert not marker.exists()


def test_a_run_that_trained_on_after_a_caught_signal_keeps_its_own_status(tmp_path, own_sigterm):
    """A notebook: Ctrl-C interrupts a cell, the next cell trains on, then closes. The signal did not end the run
    (review of session 10); one that stops at the signal, or one step after it, is still 'interrupted'."""
    for trained_after, status in ((5, "finished"), (1, "interrupted by SIGTERM after 3 steps")):
        run_dir = tmp_path / str(trained_after)
        guard, model, opt = _guard(run_dir)
        _train(guard, model, opt, 3)
        os.kill(os.getpid(), signal.SIGTERM)  # the test's own handler keeps the process going
        _train(guard, model, opt, trained_after)
        guard.close()
        meta = _committed(run_dir)[1]
        assert meta["status"] == status and meta["interrupted"] == "SIGTERM after 3 steps"
