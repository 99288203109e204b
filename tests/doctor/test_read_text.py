"""Reading a log file as text: a character cut off at the end of a killed run's log is left out, not an error."""

import pytest

from keel.doctor._text import read_text
from keel.doctor.log import LogReadError


def test_a_log_cut_inside_its_last_multi_byte_character_is_read_up_to_it(tmp_path):
    # a run killed while tqdm drew its bar ('█' is 3 bytes): the whole log was refused as "not UTF-8" (reviewer W9)
    path = tmp_path / "train.log"
    path.write_bytes("step 1 loss 2.0\n 40%|████".encode()[:-1])
    assert read_text(path) == "step 1 loss 2.0\n 40%|███"
    path.write_bytes(b"step 1 loss 2.0\n\xff\xfe step 2\n")  # not a cut: a wrong encoding stays one clear error
    with pytest.raises(LogReadError, match="not UTF-8 text"):
        read_text(path)


def test_a_killed_trainers_console_with_dicts_glued_to_its_bar_is_detected_and_read(tmp_path):
    from keel.doctor import detect_format, read_log

    bar = " {p}%|{b}         | {i}/10 [00:0{i}<00:10,  1.00{u}]"
    lines = [
        bar.format(p=i * 10, b="█" * i, i=i, u="it/s" if i % 2 else "s/it")
        + f"{{'loss': {2.5 - 0.1 * i:.2f}, 'grad_norm': 1.2, 'learning_rate': 5e-05, 'epoch': {i / 10}}}"
        for i in range(1, 8)
    ]
    path = tmp_path / "train.log"
    path.write_bytes(("\n".join(lines) + "\n 80%|███").encode()[:-2])  # killed inside the bar's last '█'
    assert detect_format(path) == "hf_console"  # was csv (glued to the bar), or "not UTF-8" (the cut)
    assert len(read_log(path).records) == 7


def test_a_binary_file_is_refused_from_its_head_without_being_read_whole(tmp_path, monkeypatch):
    # a multi-gigabyte binary given by mistake was read whole before the NUL check (reviewer W15)
    from pathlib import Path

    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00\x01" * 100_000)

    def whole(self):
        raise AssertionError("read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    with pytest.raises(LogReadError, match="binary data"):
        read_text(path)


def _cpm_ant_rows(note):
    """The CPM-Ant 10B daily log's first rows (/work/shared/data/realruns/cpm_ant_10b_daily.csv) with a text column
    of the operators' notes, in Chinese as that project's were: a killed logger cuts its last character."""
    rows = ["step,loss,grad_norm,date,note", "0,3.76,0.56,2022-05-30,开始训练", "1,3.29,0.34,2022-05-31,正常"]
    return "\n".join([*rows, f"2,3.12,0.31,2022-06-01,{note}"])


def _jsonl_rows(note):
    rows = ['{"step": 0, "loss": 3.76, "note": "开始训练"}', '{"step": 1, "loss": 3.29, "note": "正常"}']
    return "\n".join([*rows, '{"step": 2, "loss": 3.12, "note": "' + note])


@pytest.mark.parametrize(("rows", "name"), [(_cpm_ant_rows, "train.csv"), (_jsonl_rows, "train.jsonl")])
@pytest.mark.parametrize(("note", "cut"), [("正常", 1), ("正常", 2), ("ok 🔥", 1), ("ok 🔥", 3), ("é", 1)])
def test_a_streamed_log_cut_inside_its_last_multi_byte_character_is_read_up_to_it(tmp_path, rows, name, note, cut):
    # the line readers coped (read_text); the CSV and JSON-lines readers, which stream, refused the whole log
    from keel.doctor import read_log

    path = tmp_path / name
    path.write_bytes(rows(note).encode()[:-cut])
    steps = [step for step, _ in read_log(path).records]
    assert steps[:2] == [0, 1] and set(steps) <= {0, 1, 2}


@pytest.mark.parametrize(
    "tail",
    [
        b"\xe6\xad\n2,3.0,0.3,2022-06-01,x\n",  # a cut character inside the file, not at its end: another encoding
        b"\x80",  # a lone continuation byte at the end
        b"\xff",  # never UTF-8
        b"\xe6\xad\xe6",  # a cut character followed by the start of another
        b"\xed\xa0",  # the start of a UTF-16 surrogate, which UTF-8 never encodes
    ],
)
@pytest.mark.parametrize("name", ["train.csv", "train.jsonl"])
def test_bytes_that_are_no_cut_character_stay_one_clear_error(tmp_path, capsys, tail, name):
    from keel.cli import main

    path = tmp_path / name
    head = _cpm_ant_rows("x") if name.endswith(".csv") else _jsonl_rows('x"}')
    path.write_bytes(head.encode() + b"\n" + tail)
    assert main(["doctor", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err and "Traceback" not in err
