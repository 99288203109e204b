"""CSV logs written by a tracker's export or by pandas: W&B's run history saved as CSV (its ``_step`` counts log
calls, the run's own step is ``train/global_step``). Before: the history was read at ``_step`` (a Trainer run logging
every 10 steps read as logged every step, with ``_runtime``/``_timestamp`` as signals)."""

import csv
import io

from keel.doctor import examine_log, read_log

HEADER = ["", "_step", "_runtime", "_timestamp", "train/loss", "train/grad_norm", "train/global_step", "eval/loss"]


def _history(rows, na="", index=True):
    """W&B history rows as pandas' ``DataFrame.to_csv`` writes them (an index column first, ``na`` for missing)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER if index else HEADER[1:])
    for i, row in enumerate(rows):
        cells = [na if row.get(name) is None else repr(row[name]) for name in HEADER[1:]]
        writer.writerow([str(i), *cells] if index else cells)
    return buf.getvalue()


def _trainer_rows(losses, eval_every=5):
    rows = []
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        base = {"_step": len(rows), "_runtime": 1.5 * i, "_timestamp": 1.7e9 + i, "train/global_step": step}
        rows.append({**base, "train/loss": loss, "train/grad_norm": 0.6})
        if (i + 1) % eval_every == 0:
            rows.append({**base, "_step": len(rows), "eval/loss": 2.2})
    return rows


def test_a_wandb_history_is_stepped_by_the_runs_own_step(tmp_path):
    p = tmp_path / "history.csv"
    p.write_text(_history(_trainer_rows([2.5 - 0.01 * i for i in range(30)])))
    log = read_log(p)
    assert log.step_column == "train/global_step"
    assert [s for s, _ in log.records][:3] == [10, 20, 30]
    assert not {"_runtime", "_timestamp", "_step"} & {name for _, values in log.records for name in values}
    assert any("W&B history export" in note for note in log.notes)
    assert examine_log(p).summary["stride"] == 10


def test_nan_written_for_not_logged_stays_nan(tmp_path):
    # Train and eval rows of one step written with NaN for the missing cells (pandas' na_rep="NaN") cannot be told
    # from a real NaN beside an eval row: the doctor reads NaN as NaN (a critical it cannot rule out), never hiding one
    losses = [2.5 - 0.01 * i for i in range(20)]
    p = tmp_path / "history.csv"
    p.write_text(_history(_trainer_rows(losses), na="NaN"))
    assert (50, "non_finite", "critical") in [(f.step, f.kind, f.severity) for f in examine_log(p).findings]


def test_a_resume_at_the_crashed_step_stays_a_restart(tmp_path):
    p = tmp_path / "log.csv"
    rows = "step,loss,lr\n" + "".join(f"{s},{2.5 - 0.01 * s},0.001\n" for s in range(1, 30)) + "30,nan,0.001\n"
    p.write_text(rows + "30,2.2,0.001\n31,2.19,0.001\n")
    result = examine_log(p)
    assert (30, "non_finite") in [(f.step, f.kind) for f in result.findings]
    assert result.summary["restarts"]["count"] == 1
