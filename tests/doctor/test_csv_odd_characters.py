"""Session 15's open item C6: do the columnar CSV reader and the frozen record-based one disagree on odd characters
(\\u2028, \\x85, \\x1c-\\x1f, \\x0c) inside a field? They do not: both follow the csv module, which ends a row at \\n
and \\r only (as pandas' C engine does), and both read a number with such a character around it as `float` does.
The differing inputs of that fuzz run (/tmp/h26C/fuzz_ctrl_run2.out) all had a cell like ``5.4e29`` shifted into the
step column by an inserted tab: the columnar reader skips a step beyond ±2**61 (`keel.doctor.log.parse_step`, steps
are int64), the old one took it as a step. These pin the columnar reader's answers."""

import pytest

from keel.doctor import read_log
from keel.harness.bench import _doctor_legacy as legacy

CASES = {
    "u2028 in a quoted cell": ('step,loss\n1,"2.0\u2028"\n2,2.1\n', [(1, {"loss": 2.0}), (2, {"loss": 2.1})]),
    "x85 in a quoted cell": ('step,loss\n1,"2.0\x85"\n2,2.1\n', [(1, {"loss": 2.0}), (2, {"loss": 2.1})]),
    "u2028 after a step": ("step,loss\n1,2.0\n2\u2028,2.1\n", [(1, {"loss": 2.0}), (2, {"loss": 2.1})]),
    "u2028 inside a number": ("step,loss\n1,2.0\u20283.0\n2,2.1\n", [(1, {}), (2, {"loss": 2.1})]),
    "x0c inside a number": ("step\tloss\n1\t2.0\n2\t2\x0c.1\n", [(1, {"loss": 2.0}), (2, {})]),
    "x1e after a number": ("step,loss\n1,2.0\x1e\n2,2.1\n", [(1, {"loss": 2.0}), (2, {"loss": 2.1})]),
    "u2028 in a quoted name": ('step,"lo\u2028ss"\n1,2.0\n', [(1, {"lo\u2028ss": 2.0})]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_odd_characters_in_a_field_keep_the_row_whole(tmp_path, name):
    text, expected = CASES[name]
    p = tmp_path / "log.csv"
    p.write_bytes(text.encode())
    got = [(step, dict(values)) for step, values in read_log(p).records]
    assert got == expected
    assert got == [(step, dict(values)) for step, values in legacy.read_csv_log(p).records]  # the two agree


def test_a_step_beyond_int64_range_is_skipped_where_the_old_reader_took_it(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("step,loss\n1,2.0\n5.4e29,2.1\n3,2.2\n")
    log = read_log(p)
    assert [step for step, _ in log.records] == [1, 3]
    assert any("without an integer step" in note for note in log.notes)
    assert 539999999999999999478698344448 in [step for step, _ in legacy.read_csv_log(p).records]
