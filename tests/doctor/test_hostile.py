"""`keel doctor` on hostile logs (issue 12, item 11): each gives one clear error (exit 2) or a handled result
whose notes say what was done, never a traceback, a hang or a raw terminal escape."""

import os
import sqlite3
import struct

import numpy as np
import pytest

from keel.cli import main
from keel.doctor import LogReadError, examine_log, read_log
from keel.store import RunWriter
from tests.doctor.wire import FIXED32, LENGTH, VARINT, field, record, scalar_event

ESC = "\x1b"


def _doctor(capsys, *args):
    code = main(["doctor", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _one_error_line(code, out, err, expected):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keel doctor: error: "), err
    assert expected in lines[0], lines[0]


def _losses(n, seed=0):
    rng = np.random.default_rng(seed)
    return [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(n)]


# --- CSV cells over the csv module's 128 KiB limit ----------------------------------------------------------


def test_a_data_cell_over_128_kib_skips_that_row_and_says_so(tmp_path, capsys):
    rows = [f"{s},{v!r},ok" for s, v in enumerate(_losses(60))]
    rows[30] = "30,2.0," + "x" * 200_000  # one huge text cell (a logged sample, say)
    p = tmp_path / "log.csv"
    p.write_text("step,loss,note\n" + "\n".join(rows) + "\n")
    result = examine_log(p)
    assert result.summary["observations"] == 59
    assert any("line 32" in n and "131072" in n for n in result.summary["notes"]), result.summary["notes"]
    code, out, _ = _doctor(capsys, p)
    assert code == 0 and "line 32" in out


def test_a_header_line_over_128_kib_is_one_clear_error(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text("step,loss," + "h" * 200_000 + "\n0,1.0,2\n")
    with pytest.raises(LogReadError, match="header"):
        read_log(p)
    _one_error_line(*_doctor(capsys, p), "131072")


def test_a_single_line_of_8_mb_is_one_clear_error(tmp_path, capsys):
    # The 50 MB single line; 8 MB shows the same path and keeps the suite fast.
    p = tmp_path / "one_line.csv"
    p.write_bytes(b"step,loss\n" + b"1," + b"9" * 8_000_000)
    with pytest.raises(LogReadError):
        read_log(p)
    _one_error_line(*_doctor(capsys, p), str(p))


# --- paths that are not regular files ----------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_not_read_forever(tmp_path, capsys):
    fifo = tmp_path / "log.csv"
    os.mkfifo(fifo)
    with pytest.raises(LogReadError, match="not a regular file"):
        read_log(fifo)
    _one_error_line(*_doctor(capsys, fifo), "not a regular file")


@pytest.mark.timeout(20)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_inside_a_tensorboard_folder_is_skipped(tmp_path):
    (tmp_path / "events.out.tfevents.1").write_bytes(b"".join(record(scalar_event(s, "loss", 2.0)) for s in range(5)))
    os.mkfifo(tmp_path / "events.out.tfevents.2")
    assert len(read_log(tmp_path).records) == 5


def test_an_empty_path_is_refused_not_read_as_the_current_folder(capsys):
    with pytest.raises(LogReadError, match="empty path"):
        read_log("")
    _one_error_line(*_doctor(capsys, ""), "empty path")


# --- hand-crafted TensorBoard records ----------------------------------------------------------------------


def _tensor_event(step, tensor):
    value = field(1, LENGTH, b"loss") + field(8, LENGTH, tensor)
    return field(2, VARINT, step) + field(5, LENGTH, field(1, LENGTH, value))


WRONG_WIRE_TENSORS = {
    "float_val_as_varint": field(1, VARINT, 1) + field(5, VARINT, 7),
    "double_val_as_varint": field(1, VARINT, 2) + field(6, VARINT, 7),
    "int_val_as_fixed32": field(1, VARINT, 3) + field(7, FIXED32, b"\x01\x00\x00\x00"),
    "dtype_as_bytes": field(1, LENGTH, b"\x01") + field(5, FIXED32, struct.pack("<f", 1.0)),
    "shape_as_varint": field(1, VARINT, 1) + field(2, VARINT, 3) + field(5, FIXED32, struct.pack("<f", 1.0)),
}


@pytest.mark.parametrize("case", sorted(WRONG_WIRE_TENSORS))
def test_tensorboard_fields_of_the_wrong_wire_type_are_not_a_traceback(case, tmp_path, capsys):
    good = b"".join(record(scalar_event(s, "loss", 2.0)) for s in range(3))
    p = tmp_path / "events.out.tfevents.1"
    p.write_bytes(good + record(_tensor_event(3, WRONG_WIRE_TENSORS[case])))
    try:
        result = examine_log(p)
    except LogReadError:
        _one_error_line(*_doctor(capsys, p), str(p))
    else:
        assert result.summary["observations"] in (3, 4)
        assert _doctor(capsys, p)[0] == 0


# --- keel run stores with hostile contents -----------------------------------------------------------------


def _store(tmp_path, n=40):
    run = tmp_path / "run"
    with RunWriter(run) as w:
        for s, v in enumerate(_losses(n)):
            w.add_signals(s, {"loss": v})
    return run


BAD_DIAGNOSES = {
    "no_summary": [{"cause": "x", "kind": "loss_spike"}],
    "summary_not_text": [{"summary": 12}],
    "not_a_list": {"summary": "x"},
    "list_of_text": ["one", "two"],
    "escape_codes": [{"summary": f"{ESC}]0;owned{ESC}\\{ESC}[31mred"}],
}


@pytest.mark.parametrize("case", sorted(BAD_DIAGNOSES))
def test_a_store_whose_recorded_diagnosis_is_malformed_is_read_and_noted(case, tmp_path, capsys):
    run = _store(tmp_path)
    with RunWriter(run) as w:
        w.set_meta({"diagnosis": BAD_DIAGNOSES[case]})
    code, out, _ = _doctor(capsys, run)
    assert code == 0 and ESC not in out
    if case != "escape_codes":
        assert "diagnosis" in out and "left out" in out


def test_text_in_a_stores_step_column_is_left_out_and_counted(tmp_path, capsys):
    run = _store(tmp_path)
    conn = sqlite3.connect(run / "run.sqlite")
    conn.execute("INSERT INTO signals (step, key, value) VALUES ('abc', 'loss', 1.0)")
    conn.execute(
        "INSERT INTO decisions (step, action, reason, actor, onset, restored_step) "
        "VALUES (5, 'rollback', 'x', 'guard', 'x', '<b>')"
    )
    conn.commit()
    conn.close()
    result = examine_log(run)
    assert result.summary["observations"] == 40
    assert any("signals" in n and "left out" in n for n in result.summary["notes"]), result.summary["notes"]
    assert _doctor(capsys, run)[0] == 0


def test_a_store_missing_its_signals_table_is_one_clear_error(tmp_path, capsys):
    run = _store(tmp_path)
    conn = sqlite3.connect(run / "run.sqlite")
    conn.execute("DROP TABLE signals")
    conn.commit()
    conn.close()
    _one_error_line(*_doctor(capsys, run), "signals")


# --- duplicate column names ----------------------------------------------------------------------------------


def test_duplicate_columns_keep_the_first_and_say_which_was_used(tmp_path, capsys):
    first, second = _losses(80, seed=1), _losses(80, seed=2)
    first[60] = 500.0  # 250× the loss level, only in the first of the two "loss" columns
    p = tmp_path / "log.csv"
    p.write_text(
        "step,loss,loss\n" + "".join(f"{s},{a!r},{b!r}\n" for s, (a, b) in enumerate(zip(first, second, strict=True)))
    )
    result = examine_log(p)
    assert (60, "loss_spike", "critical") in [(f.step, f.kind, f.severity) for f in result.findings]
    note = next(n for n in result.summary["notes"] if "loss" in n and "column 3" in n)
    assert "column 2" in note
    assert result.summary["signals"]["loss"]["column"] == "loss"
    code, out, _ = _doctor(capsys, p)
    assert "column 3" in out


def test_duplicate_json_keys_say_that_the_last_was_used(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text("".join(f'{{"step": {s}, "loss": 9.0, "loss": {v!r}}}\n' for s, v in enumerate(_losses(30))))
    result = examine_log(p)
    assert any("repeated key" in n and "loss" in n for n in result.summary["notes"]), result.summary["notes"]
    assert result.summary["signals"]["loss"]["observations"] == 30


# --- terminal escape codes ---------------------------------------------------------------------------------

ESCAPES = [f"{ESC}[2J{ESC}[31mred", f"x{ESC}]0;title\a", "bidi\u202eevil", "bell\a", "cr\rover", "nl\nnew"]


@pytest.mark.parametrize("name", ESCAPES)
def test_escape_codes_in_column_names_are_shown_escaped(name, tmp_path, capsys):
    p = tmp_path / "log.csv"
    rows = [f"{s},{v!r},{1.0 + s % 2},t{s}" for s, v in enumerate(_losses(40))]
    header = f'step,loss,"{name}","{name}_text"'  # a numeric and a text column with the hostile name
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    for args in ((p,), (p, "--all")):
        code, out, _ = _doctor(capsys, *args)
        assert code == 0
        assert not any(c in out for c in (ESC, "\a", "\r", "\u202e")), repr(out)
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)  # \x1b, \n, \u202e ...
        assert f"{shown}_text" in out  # listed as a text column left out, escaped and on one line


def test_escape_codes_in_an_error_message_are_shown_escaped(tmp_path, capsys):
    p = tmp_path / "log.csv"
    p.write_text(f"loss,{ESC}[31mred\n1,2\n")
    code, out, err = _doctor(capsys, p)
    _one_error_line(code, out, err, "no step column")
    assert ESC not in err and "\\x1b[31mred" in err


def test_escape_codes_in_stored_findings_are_shown_escaped(tmp_path, capsys):
    from keel._core import Finding

    run = _store(tmp_path)
    with RunWriter(run) as w:
        w.add_findings(
            [
                Finding(
                    step=3,
                    kind=f"{ESC}[31mkind",
                    severity="critical",
                    signal=f"{ESC}[2Jsig",
                    cause=f"{ESC}]0;x\a",
                    advice="\u202e",
                    evidence={f"{ESC}k": f"{ESC}v"},
                )
            ]
        )
    code, out, _ = _doctor(capsys, run, "--all")
    assert ESC not in out and "\u202e" not in out
