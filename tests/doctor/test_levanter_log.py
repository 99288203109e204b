"""levanter's console: its ``pbar_logger`` (``levanter/callbacks.py``) draws a tqdm bar ``desc="train"`` and, each
step, ``pbar.update(step.next_step - pbar.n)`` and ``pbar.set_postfix(loss=...)``. Rendered here by tqdm itself
the way levanter calls it, then read by the tqdm-postfix reader (no reader of its own is needed).

Not covered: levanter's non-terminal output through tqdm-loggable (its own line format, every 60 s).
"""

from __future__ import annotations

import io

from keel.doctor import detect_format, examine_log, read_log


def _levanter_console(path, steps=300, spike_at=None):
    from tqdm import tqdm

    screen = io.StringIO()
    pbar = tqdm(total=steps, desc="train", file=screen, mininterval=0, ncols=100)
    for step in range(steps):  # levanter's update_pbar: next_step is step + 1
        pbar.update(step + 1 - pbar.n)
        loss = 3.0 - step / 1000 + 0.003 * (step % 7)
        pbar.set_postfix(loss=loss * (4 if step + 1 == spike_at else 1))
    pbar.close()
    path.write_text(screen.getvalue())


def test_levanters_progress_bar_is_read_with_its_loss(tmp_path):
    path = tmp_path / "levanter.log"
    _levanter_console(path)
    assert detect_format(path) == "tqdm"
    log = read_log(path)
    assert len(log.records) == 300 and "loss" in log.records.columns


def test_a_loss_spike_in_levanters_bar_is_found(tmp_path):
    path = tmp_path / "levanter.log"
    _levanter_console(path, spike_at=200)
    found = [f for f in examine_log(path).findings if f.severity in ("warning", "critical")]
    assert [f.step for f in found] == [200]
