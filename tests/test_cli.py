import json
import os
import subprocess
import sys

import pytest

from keel.cli import main
from keel.store import RunReader


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) == 2


def test_help_imports_no_torch():
    code = (
        "import sys; from keel.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("False"), out.stderr


def test_demo_quick_writes_both_stores(tmp_path, capsys, monkeypatch):
    import keel.demo

    monkeypatch.setattr(keel.demo, "QUICK_STEPS", 20)
    assert main(["demo", "--quick", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"reference", "bare", "guarded", "recovering", "stabilized"}
    assert result["stabilized"]["stabilize"] == ["qk_norm", "z_loss"]
    for name in result:
        with RunReader(tmp_path / name) as r:
            assert r.meta()["status"] == "finished"
            assert len(r.signal("loss")[0]) == 20


def test_a_stdout_that_cannot_encode_keels_symbols_prints_them_as_question_marks(tmp_path):
    # PYTHONIOENCODING=ascii (a C locale), latin-1, a Windows cp1252 console or file: keel list/doctor/sweep raised
    # UnicodeEncodeError on their ×, →, – and called it the user's bad input, exit 2 (reviewer V19)
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    done = subprocess.run([sys.executable, "-m", "keel.cli", "list"], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode("ascii", "replace")
    assert b"?" in done.stdout and done.stdout.decode("ascii")  # all ASCII, the symbols replaced
