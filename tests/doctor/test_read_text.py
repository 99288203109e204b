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
