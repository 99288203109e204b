"""Every verb answers bad input with one error line on stderr and exit status 2 — no traceback, nothing written.

README's promise ("bad input gets one error line and exit 2") over a table of hostile command lines for each
verb. The work behind every verb (training, benchmarks, sweeps) is replaced by a stub that fails the case, so a
bad value that slips past validation shows up at once instead of starting minutes of work: validation must come
first. Readers (export, report, doctor, sweep --summarize) run for real: what they find wrong is part of the
contract.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keel.demo
import keel.harness.bench.ddp
import keel.harness.bench.detect
import keel.harness.bench.doctor
import keel.harness.bench.integrations
import keel.harness.bench.optim
import keel.harness.bench.overhead
import keel.harness.bench.running_stats
import keel.harness.bench.snapshot
import keel.proxy.sweep.cli
from keel.cli import main
from keel.store import RunWriter

HUGE = str(10**30)  # past int64: cannot be stored or seeded, and as a step count it would run forever
INT64_OVER = str(2**63)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


class Reached(Exception):
    """Raised by the stubbed work: validation let the case through."""


# Everything that trains or measures. keel.cli turns Reached into exit status 1 ("internal error"), so a case
# that gets this far fails its assertion with the stub's name in the message.
WORK = [
    (keel.demo, "run_demo"),
    (keel.harness.bench.overhead, "bench_overhead"),
    (keel.harness.bench.ddp, "bench_ddp_overhead"),
    (keel.harness.bench.snapshot, "bench_snapshot"),
    (keel.harness.bench.running_stats, "copy_costs"),
    (keel.harness.bench.optim, "bench_optim"),
    (keel.harness.bench.detect, "bench_detect"),
    (keel.harness.bench.detect, "probe_costs"),
    (keel.harness.bench.doctor, "run"),
    (keel.harness.bench.integrations, "bench_integrations"),
    (keel.proxy.sweep.cli, "run_sweep"),
]


@pytest.fixture
def no_work(monkeypatch):
    for module, name in WORK:

        def stub(*args, _name=f"{module.__name__}.{name}", **kwargs):
            raise Reached(f"{_name} was called")

        monkeypatch.setattr(module, name, stub)


def _unwritable_folder(tmp: Path) -> Path | None:
    """A folder this process cannot create files in: a read-only one, or /sys for root (whom modes don't stop)."""
    if os.geteuid() != 0:
        folder = tmp / "readonly"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return None
    except OSError:
        return Path("/sys")


@pytest.fixture
def world(tmp_path, monkeypatch, no_work):
    """A working folder with a good run store and every kind of bad path; the cases run inside it."""
    with RunWriter(tmp_path / "run") as w:
        w.add_signals(0, {"loss": 2.5})
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.sqlite").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "corrupt" / "sweep.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    (tmp_path / "afile").write_text("hello\n")
    (tmp_path / "emptydir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere/at/all")
    (tmp_path / "raises_recipe.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "exits_recipe.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "syntax_recipe.py").write_text("def r(c) return c\n")
    (tmp_path / "good_recipe.py").write_text("def r(c):\n    return c\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    for name in ("raises_recipe", "exits_recipe", "syntax_recipe", "good_recipe"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    unwritable = _unwritable_folder(tmp_path)
    yield tmp_path, unwritable
    if unwritable is not None and unwritable.is_relative_to(tmp_path):
        unwritable.chmod(0o700)


def _tree(root: Path) -> dict[str, object]:
    """Every path under ``root`` with its kind and content digest: what a case must leave as it found it.

    Left out: the ``-shm`` index and the empty ``-wal`` that SQLite creates next to a WAL-mode store when it is
    opened read-only (and leaves, as a read-only connection may not delete them); the store itself is compared.
    """
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.endswith("-shm") or (path.name.endswith("-wal") and path.stat().st_size == 0):
            continue
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_fifo():
            out[rel] = "fifo"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def c(*argv: str, marks=()):
    name = " ".join(argv).encode("unicode_escape").decode() or "<empty>"
    return pytest.param(list(argv), id=name if len(name) <= 60 else name[:57] + "...", marks=marks)


UNWRITABLE = "{unwritable}"  # replaced by the world's unwritable folder; the case is skipped without one

CASES = [
    # top level
    c(""),
    c("nope"),
    c("--nope"),
    c("list", "--json", "extra"),
    c("list", "--nope"),
    # demo: its only input is where the stores go
    c("demo", "--out", "afile"),
    c("demo", "--out", "afile/sub"),
    c("demo", "--out", ""),
    c("demo", "--out", "a\x00b"),
    c("demo", "--out", "fifo"),
    c("demo", "--out", f"{UNWRITABLE}/demo"),
    c("demo", "--out", "loop"),
    c("demo", "--out", "dangling"),
    c("demo", "--out", "x" * 300),
    c("demo", "--quick", "--json", "--out", "afile"),
    c("demo", "--steps", "5"),
    c("demo", "extra"),
    # bench
    c("bench"),
    c("bench", "nope"),
    c("bench", "overhead", "--steps", "-5"),
    c("bench", "overhead", "--steps", "0"),
    c("bench", "overhead", "--steps", ""),
    c("bench", "overhead", "--steps", "1.5"),
    c("bench", "overhead", "--steps", HUGE),
    c("bench", "overhead", "--steps", INT64_OVER),
    c("bench", "overhead", "--steps", "1\x00"),
    c("bench", "overhead", "--steps", "9" * 5000),
    c("bench", "overhead", "--repeats", "0"),
    c("bench", "overhead", "--batch-size", "-1"),
    c("bench", "overhead", "--seq-len", "0"),
    c("bench", "overhead", "--full-log-every", "0"),
    c("bench", "overhead", "--size", "huge"),
    c("bench", "overhead", "--device", "gpu"),
    c("bench", "overhead", "--device", "cuda", marks=NO_CUDA),
    c("bench", "overhead", "--ddp", "0"),
    c("bench", "overhead", "--ddp", "1"),
    c("bench", "overhead", "--ddp", "-2"),
    c("bench", "overhead", "--ddp", "2", "--full-log-every", "1"),
    c("bench", "overhead", "--ddp", "999", "--device", "cuda"),
    c("bench", "overhead", "--json", "--steps", "-5"),
    c("bench", "running-stats", "--repeats", "0"),
    c("bench", "running-stats", "--repeats", HUGE),
    c("bench", "running-stats", "--steps", "-5"),
    c("bench", "running-stats", "--steps", "1.5"),
    c("bench", "snapshot", "--repeats", "0"),
    c("bench", "snapshot", "--repeats", HUGE),
    c("bench", "snapshot", "--sizes", "1G"),
    c("bench", "snapshot", "--sizes", ""),
    c("bench", "snapshot", "--sizes", "50M,"),
    c("bench", "snapshot", "--device", "cuda", marks=NO_CUDA),
    c("bench", "optim", "--steps", "-5"),
    c("bench", "optim", "--threads", "0"),
    c("bench", "optim", "--threads", str(10**6)),
    c("bench", "optim", "--d-model", "0"),
    c("bench", "optim", "--layers", "-1"),
    c("bench", "optim", "--repeats", "nan"),
    c("bench", "optim", "--optimizers", "nope"),
    c("bench", "optim", "--device", "cuda", marks=NO_CUDA),
    c("bench", "detect", "--only", "nope"),
    c("bench", "detect", "--seed", "-1"),
    c("bench", "detect", "--seed", str(2**64)),
    c("bench", "detect", "--json", "--seed", "x"),
    c("bench", "detect", "--probe-costs", "--repeats", "0"),
    c("bench", "detect", "--probe-costs", "--threads", "0"),
    c("bench", "detect", "--probe-costs", "--steps", "-1"),
    c("bench", "detect", "--probe-costs", "--only", "lr_spike"),
    c("bench", "detect", "--repeats", "3"),
    c("bench", "doctor", "--data", "nope"),
    c("bench", "doctor", "--data", "afile"),
    # doctor (its reader's own hostile inputs are tests/doctor's)
    c("doctor", "nope"),
    c("doctor", "afile"),
    c("doctor", "emptydir"),
    c("doctor", "corrupt"),
    c("doctor", "run", "--fail-on", "info"),
    c("doctor", "run", "--format", "xml"),
    c("doctor"),
    # report
    c("report", "nope", "-o", "out.html"),
    c("report", "corrupt", "-o", "out.html"),
    c("report", "emptydir", "-o", "out.html"),
    c("report", "run", "-o", "emptydir"),
    c("report", "run", "-o", "afile/x.html"),
    c("report", "run", "-o", "fifo"),
    c("report", "run", "-o", f"{UNWRITABLE}/report.html"),
    c("report", "run", "-o", ""),
    c("report", "run", "-o", "a\x00.html"),
    c("report", ""),
    c("report"),
    # export
    c("export", "nope", "--format", "csv"),
    c("export", "corrupt", "--format", "csv"),
    c("export", "afile", "--format", "csv"),
    c("export", "emptydir", "--format", "csv"),
    c("export", "fifo", "--format", "csv"),
    c("export", "", "--format", "csv"),
    c("export", "a\x00", "--format", "csv"),
    c("export", "\udcff", "--format", "csv"),
    c("export", "x" * 300, "--format", "csv"),
    c("export", "loop", "--format", "csv"),
    c("export", "run", "--format", "xml"),
    c("export", "run"),
    c("export", "run", "--format", "csv", "--out", "afile"),
    c("export", "run", "--format", "csv", "--out", f"{UNWRITABLE}/export"),
    c("export", "run", "--format", "csv", "--keys", "nomatch"),
    c("export", "run", "--format", "csv", "--keys", ","),
    c("export", "run", "--format", "csv", "--keys", "loss,nomatch*"),
    c("export", "run", "--format", "csv", "--project", "p"),
    c("export", "run", "--format", "wandb", "--tracking-uri", "file:x"),
    c("export", "run", "--format", "jsonl", "--online", "--json"),
    # sweep
    c("sweep", "--steps", "-5"),
    c("sweep", "--workers", "0"),
    c("sweep", "--workers", "-3"),
    c("sweep", "--lrs", "-1"),
    c("sweep", "--lrs", "nan"),
    c("sweep", "--lrs", "inf"),
    c("sweep", "--lrs", "1e400"),
    c("sweep", "--lrs", "1e-3", ""),
    c("sweep", "--batch-size", "0"),
    c("sweep", "--seq-len", HUGE),
    c("sweep", "--warmup", "-1"),
    c("sweep", "--final-lr", "-1"),
    c("sweep", "--eval-batches", "0"),
    c("sweep", "--max-grad-norm", "-1"),
    c("sweep", "--seeds", "-1"),
    c("sweep", "--seeds", str(2**64)),
    c("sweep", "--sizes", "huge"),
    c("sweep", "--backend", "nope"),
    c("sweep", "--recipes", "nope"),
    c("sweep", "--recipes", ""),
    c("sweep", "--recipes", "no.such.module:f"),
    c("sweep", "--recipes", "raises_recipe:r"),
    c("sweep", "--recipes", "raises_recipe.py:r"),
    c("sweep", "--recipes", "exits_recipe:r"),
    c("sweep", "--recipes", "syntax_recipe.py:r"),
    c("sweep", "--recipes", "missing.py:r"),
    c("sweep", "--recipes", "good_recipe:nofn"),
    c("sweep", "--recipes", "baseline", "baseline", "--out", "sw"),
    c("sweep", "--recipes", "good_recipe:r", "good_recipe.py:r"),  # two recipes named r: one run id
    c("sweep", "--lrs", "1e-3", "0.0010000001"),
    c("sweep", "--seeds", "0", "00"),
    c("sweep", "--sizes", "tiny", "tiny"),
    c("sweep", "--summarize", "--out", "nope"),
    c("sweep", "--summarize", "--out", "afile"),
    c("sweep", "--summarize", "--out", "corrupt"),
    c("sweep", "--summarize", "--steps", "5", "--out", "run"),
    c("sweep", "--out", "afile"),
    c("sweep", "--out", "afile/sub"),
    c("sweep", "--out", ""),
    c("sweep", "--out", f"{UNWRITABLE}/sweep"),
    c("sweep", "--plots", "afile"),
    c("sweep", "--no-plots", "--plots", "p"),
    c("sweep", "--address", "auto"),
    c("sweep", "--json", "--workers", "0"),
    c("sweep", "--scaling-lr", "-1"),
    c("sweep", "--divergence-logit", "nan"),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit (only --help should take it)
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert (code, len(lines)) == (2, 1), f"exit {code}, stderr:\n{err}"
    assert lines[0].startswith("keel") and ": error: " in lines[0], lines[0]
    assert "Traceback" not in err
    assert out == "", f"stdout of a refused command: {out!r}"


@pytest.mark.parametrize("argv", CASES)
def test_bad_input_gets_one_error_line_and_exit_status_2(argv, world, capsys):
    root, unwritable = world
    if any(UNWRITABLE in a for a in argv):
        if unwritable is None:
            pytest.skip("no folder here refuses this process's writes")
        argv = [a.replace(UNWRITABLE, str(unwritable)) for a in argv]
    before = _tree(root)
    code, out, err = run_cli(argv, capsys)
    assert_one_error_line(code, out, err)
    assert _tree(root) == before, "a refused command wrote or removed files"


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "overhead", "--ddp", "0"],  # once silently ran the single-process benchmark
        ["sweep", "--workers", "0", "--out", "sw"],
        ["export", "nope", "--format", "csv"],
        ["report", "run", "-o", "fifo"],  # writing a FIFO nobody reads hung forever
    ],
)
def test_a_real_process_exits_2_with_one_line(argv, world):
    root, _ = world
    proc = subprocess.run(
        [sys.executable, "-m", "keel.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "KEEL_DEBUG": ""},
    )
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr)


def test_the_installed_keel_script_exits_2(world):
    script = Path(sys.executable).with_name("keel")
    if not script.exists():
        pytest.skip("keel is not installed as a script in this environment")
    proc = subprocess.run(
        [str(script), "sweep", "--steps", "-5"], capture_output=True, text=True, timeout=120, cwd=world[0]
    )
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("keel sweep: error: argument --steps: '-5'")


def test_the_message_names_the_value_and_what_is_allowed(world, capsys):
    _, _, err = run_cli(["sweep", "--workers", "0"], capsys)
    assert err == "keel sweep: error: argument --workers: '0'; allowed: an int from 1 to 2**63 - 1\n"
    _, _, err = run_cli(["bench", "overhead", "--ddp", "0"], capsys)
    assert "argument --ddp: '0'; allowed: an int from 2" in err
    _, _, err = run_cli(["sweep", "--recipes", "raises_recipe:r"], capsys)
    assert "raises_recipe" in err and "RuntimeError: boom at import" in err


def test_control_characters_in_a_value_are_shown_escaped(world, capsys):
    code, _, err = run_cli(["report", "\x1b[31mred\nline", "-o", "out.html"], capsys)
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err and "\\x1b" in err


# --- what is not the input's fault ----------------------------------------------------------------------


def _fail_work_with(monkeypatch, exc: BaseException) -> None:
    def work(*args, **kwargs):
        raise exc

    monkeypatch.setattr(keel.harness.bench.optim, "bench_optim", work)


def test_a_keel_bug_is_one_line_exit_1_with_the_debug_hint(world, monkeypatch, capsys):
    _fail_work_with(monkeypatch, TypeError("unsupported operand"))
    code, out, err = run_cli(["bench", "optim"], capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err == (
        "keel bench optim: internal error: TypeError: unsupported operand (a keel bug; KEEL_DEBUG=1 "
        "shows the traceback)\n"
    )


def test_keel_debug_shows_the_traceback(world, monkeypatch):
    _fail_work_with(monkeypatch, TypeError("unsupported operand"))
    monkeypatch.setenv("KEEL_DEBUG", "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["bench", "optim"])


def test_ctrl_c_is_one_line_and_exit_130(world, monkeypatch, capsys):
    _fail_work_with(monkeypatch, KeyboardInterrupt())
    assert run_cli(["bench", "optim"], capsys)[::2] == (130, "keel bench optim: interrupted\n")


def test_a_missing_optional_extra_is_the_input_s_choice(world, monkeypatch, capsys):
    try:
        import nonexistent_extra  # noqa: F401
    except ImportError as cause:
        missing = ImportError("keel export --format x needs x: pip install 'keel[x]'")
        missing.__cause__ = cause
    _fail_work_with(monkeypatch, missing)
    code, _, err = run_cli(["bench", "optim"], capsys)
    assert (code, err) == (2, "keel bench optim: error: keel export --format x needs x: pip install 'keel[x]'\n")


def test_an_os_error_names_the_path_not_the_errno(world, monkeypatch, capsys):
    _fail_work_with(monkeypatch, PermissionError(13, "Permission denied", "/data/run.sqlite"))
    assert run_cli(["bench", "optim"], capsys)[::2] == (
        2,
        "keel bench optim: error: /data/run.sqlite: Permission denied\n",
    )


# --- generated values for every numeric flag --------------------------------------------------------------

POSITIVE_INT = ("int", 1, 2**63 - 1)
NONNEGATIVE_INT = ("int", 0, 2**63 - 1)
THREADS = ("int", 1, os.cpu_count() or 1)
POSITIVE_FLOAT = ("float", 0.0, False)
NONNEGATIVE_FLOAT = ("float", 0.0, True)

NUMERIC_FLAGS = [
    (["bench", "overhead"], flag, POSITIVE_INT)
    for flag in ("--steps", "--repeats", "--batch-size", "--seq-len", "--full-log-every")
] + [
    (["bench", "overhead"], "--ddp", ("int", 2, 2**63 - 1)),
    (["bench", "snapshot"], "--repeats", POSITIVE_INT),
    *[(["bench", "optim"], flag, POSITIVE_INT) for flag in ("--d-model", "--layers", "--steps", "--repeats")],
    (["bench", "optim"], "--threads", THREADS),
    (["bench", "detect"], "--seed", NONNEGATIVE_INT),
    *[(["bench", "detect", "--probe-costs"], flag, POSITIVE_INT) for flag in ("--steps", "--repeats")],
    (["bench", "detect", "--probe-costs"], "--threads", THREADS),
    *[
        (["sweep"], flag, POSITIVE_INT)
        for flag in ("--steps", "--batch-size", "--seq-len", "--eval-batches", "--workers")
    ],
    *[(["sweep"], flag, NONNEGATIVE_INT) for flag in ("--warmup", "--seeds")],
    *[(["sweep"], flag, POSITIVE_FLOAT) for flag in ("--lrs", "--scaling-lr", "--divergence-logit")],
    *[(["sweep"], flag, NONNEGATIVE_FLOAT) for flag in ("--final-lr", "--max-grad-norm")],
]


def _allowed(text: str, rule: tuple) -> bool:
    kind, low, high_or_inclusive = rule
    if kind == "int":
        try:
            return low <= int(text, 10) <= high_or_inclusive
        except ValueError:
            return False
    try:
        value = float(text)
    except ValueError:
        return False
    return value < float("inf") and (value > low or (high_or_inclusive and value == low))


VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-3, 3).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e3", "0x10", "1_000", "-0", "٣", "inf", "-inf", "nan", "1\x00", "\x1b[2J"]),
    st.text(max_size=8),
)


@pytest.mark.parametrize(
    "prefix,flag,rule",
    NUMERIC_FLAGS,
    ids=lambda v: " ".join(v) if isinstance(v, list) else v if isinstance(v, str) else "",
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_a_numeric_flag_is_refused_exactly_when_out_of_range(prefix, flag, rule, value, world, capsys):
    """Allowed values reach the (stubbed) work; every other string gets one error line and exit status 2."""
    code, out, err = run_cli([*prefix, f"{flag}={value}"], capsys)
    if _allowed(value, rule):
        assert code == 1 and "Reached" in err, f"{flag}={value!r} was refused: {err}"
    else:
        assert_one_error_line(code, out, err)


# --- help stays available and fast ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["bench"],
        ["bench", "overhead"],
        ["bench", "snapshot"],
        ["bench", "optim"],
        ["bench", "detect"],
        ["bench", "doctor"],
        ["doctor"],
        ["report"],
        ["export"],
        ["list"],
        ["sweep"],
    ],
)
def test_help_of_every_verb_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: keel")


def test_a_reader_that_leaves_early_ends_it_quietly():
    """`keel list | head -1`: stdout closed under the verb ends it with 141 (SIGPIPE's status), no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "keel.cli", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=120), err) == (141, "")


def test_an_aborted_run_is_an_outcome_not_a_bug(world, monkeypatch, capsys):
    from keel import TrainingAborted

    _fail_work_with(monkeypatch, TrainingAborted("keel aborted the run at step 7: 3 rollbacks in 50 steps"))
    assert run_cli(["bench", "optim"], capsys)[::2] == (
        1,
        "keel bench optim: aborted: keel aborted the run at step 7: 3 rollbacks in 50 steps\n",
    )
