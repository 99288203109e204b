"""The progress bar of the verbs that read a whole store or folder: on a terminal's stderr, never in their output."""

from __future__ import annotations

import os
import pty
import sys
import termios

from keel._core.progress import print_above_progress, step_progress


def test_lines_printed_during_a_bar_go_to_stdout_whole_and_the_bar_counts_plain_units(monkeypatch, capsys):
    main_fd, terminal_fd = pty.openpty()
    termios.tcsetwinsize(terminal_fd, (24, 100))
    try:
        with os.fdopen(terminal_fd, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            with step_progress((0, 3), "keel doctor", unit="run") as reached:
                reached(1)
                print_above_progress("run 1: no findings")
                reached(3)
            monkeypatch.undo()
        os.set_blocking(main_fd, False)
        seen = os.read(main_fd, 65536).decode()
    finally:
        os.close(terminal_fd)
        os.close(main_fd)
    assert capsys.readouterr().out == "run 1: no findings\n"
    assert "keel doctor" in seen and "0/3" in seen and "3.00" not in seen, seen  # drawn at once, then by time


def test_a_bar_that_is_off_prints_nothing(capsys):
    with step_progress((0, 1_000_000), "keel export csv", enabled=False) as reached:
        reached(500_000)
    print_above_progress("done")
    assert capsys.readouterr() == ("done\n", "")
