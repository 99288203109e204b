"""keel speaks (issue 14, item 2): warnings, criticals and decisions as `keel` log lines, rate-limited, a summary at
close, and a stderr handler of its own when the application configured no logging."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from keel import Guard, RecoveryConfig
from keel._core.decision import Decision
from keel._core.finding import Finding
from keel.guard.console import LOGGER_NAME, Console, ConsoleConfig, progress_bar, silenced
from tests.conftest import TinyNet, make_batches


def _nan_loss_run(run_dir, steps: int = 32, at: int = 23) -> Guard:
    """A recovering TinyNet run whose loss is NaN on four steps from ``at``: three skips, then a rollback."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(
        model,
        opt,
        policy="recover",
        max_consecutive_skips=3,
        run_dir=str(run_dir) if run_dir is not None else None,
        recovery=RecoveryConfig(snapshot_every=5, quiet_steps=1),
    )
    for step, (x, y) in enumerate(make_batches(steps)):
        loss = F.mse_loss(model(x), y) * (float("nan") if at <= step < at + 4 else 1.0)
        loss.backward()
        guard.step(loss)
        opt.zero_grad()
    guard.close()
    return guard


def _keel_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME]


def test_a_recovering_run_logs_its_critical_findings_skips_rollback_and_a_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    guard = _nan_loss_run(tmp_path / "run")
    [rollback] = [d for d in guard.decisions if d.action == "rollback"]
    records = _keel_lines(caplog)
    lines = [r.getMessage() for r in records]

    critical = [r for r in records if r.levelno == logging.ERROR and "non_finite" in r.getMessage()]
    assert critical and critical[0].getMessage().startswith("step 23 non_finite critical"), lines
    assert "Non-finite loss" in critical[0].getMessage() and "advice: Skip this update" in critical[0].getMessage()
    assert all("\n" not in r.getMessage() for r in records if r.levelno != logging.INFO)  # one line each
    skips = [m for m in lines if re.match(r"step 2[345] skip", m)]
    assert len(skips) == 3, lines
    [line] = [m for m in lines if " rollback" in m.split(":")[0]]
    assert line.startswith(
        f"step {rollback.step} rollback from step {rollback.step} to step {rollback.restored_step}"
    ), line
    assert "actions: LR × 0.1" in line  # the action taken
    [summary] = [r for r in records if r.levelno == logging.INFO]
    text = summary.getMessage()
    assert records[-1] is summary  # the summary closes the run's lines
    n_non_finite = sum(f.kind == "non_finite" for f in guard.findings)
    assert f"non_finite {n_non_finite} (critical {n_non_finite})" in text, text
    assert "3 skips" in text and f"1 rollback (step {rollback.step} → step {rollback.restored_step})" in text, text
    assert "cause 1: non-finite values (first seen at step 23" in text, text  # the diagnosis keel names
    assert str(tmp_path / "run" / "run.sqlite") in text and f"keel report {tmp_path / 'run'}" in text, text


def test_a_clean_run_says_only_its_summary(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with Guard(model, opt, policy="skip") as guard:
        for x, y in make_batches(5):
            F.mse_loss(model(x), y).backward()
            guard.step(F.mse_loss(model(x), y).detach())
            opt.zero_grad()
    [summary] = _keel_lines(caplog)
    assert summary.levelno == logging.INFO
    text = summary.getMessage()
    assert "5 steps" in text and "no warning or critical finding" in text and "run_dir=None" in text, text


def _finding(step: int, kind: str = "loss_spike", severity: str = "warning") -> Finding:
    return Finding(
        step=step,
        kind=kind,
        severity=severity,
        signal="loss",
        value=9.0,
        baseline=1.0,
        cause="the loss jumped\nfar above its median",
        advice="look at the batch",
    )


def test_info_findings_are_debug_lines_and_hidden_at_info_level(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    console = Console()
    console.step(Decision(step=3, findings=(_finding(3, severity="info"),)))
    assert _keel_lines(caplog) == []
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    console.step(Decision(step=4, findings=(_finding(4, severity="info"),)))
    [record] = _keel_lines(caplog)
    assert record.levelno == logging.DEBUG and record.getMessage().startswith("step 4 loss_spike info")
    assert "the loss jumped far above its median" in record.getMessage()  # the cause on one line


def test_a_noisy_run_prints_a_bounded_number_of_lines_and_counts_the_rest(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    console = Console(ConsoleConfig(first_lines=3, note_every=100))
    for step in range(1000):
        console.step(Decision(step=step, findings=(_finding(step),)))
    console.flush()
    lines = [r.getMessage() for r in _keel_lines(caplog)]
    assert len(lines) <= 3 + 1000 // 100 + 1, lines
    assert lines[:3] == [m for m in lines if m.startswith("step ") and "more" not in m]
    notes = [m for m in lines if "more loss_spike" in m]
    hidden = [int(re.search(r"(\d+) more loss_spike", m).group(1)) for m in notes]
    assert sum(hidden) == 1000 - 3, notes  # every line not shown is counted
    assert notes[0].startswith("step 103: 101 more loss_spike lines since step 3 not shown (warning 101)"), notes
    assert notes[-1].startswith("end of run: 88 more loss_spike lines since step 912"), notes


def test_rollbacks_and_aborts_are_never_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    console = Console(ConsoleConfig(first_lines=1, note_every=1000))
    for step in range(20):
        console.step(Decision(step=step, action="rollback", restored_step=0, onset=step, reason="rolled back"))
    console.step(Decision(step=20, action="abort", reason="rollbacks keep repeating"))
    lines = [r.getMessage() for r in _keel_lines(caplog)]
    assert sum(" rollback from step" in m for m in lines) == 20
    assert lines[-1] == "step 20 abort: rollbacks keep repeating"


EVENTS = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from(["loss_spike", "grad_spike", "divergence"]),
        st.sampled_from(["warning", "critical"]),
    ),
    max_size=300,
)


@settings(max_examples=80, deadline=None)
@given(events=EVENTS, first=st.integers(0, 5), every=st.integers(1, 60))
def test_every_warning_and_critical_is_printed_or_counted(events, first, every):
    """Property: per kind, lines shown + lines counted in the notes = findings; at most ``first`` full lines."""
    shown: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    logger, handler = logging.getLogger(LOGGER_NAME), Catch(logging.DEBUG)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    try:
        console = Console(ConsoleConfig(first_lines=first, note_every=every))
        step = 0
        for gap, kind, severity in events:
            step += gap
            console.step(Decision(step=step, findings=(_finding(step, kind, severity),)))
        console.flush()
    finally:
        logger.removeHandler(handler)
        logger.level = level
    for kind in ("loss_spike", "grad_spike", "divergence"):
        full = [m for m in shown if m.startswith("step ") and f" {kind} " in m and "more" not in m]
        counted = sum(int(m.split(f" more {kind}")[0].rsplit(" ", 1)[-1]) for m in shown if f" more {kind}" in m)
        assert len(full) == min(first, sum(k == kind for _, k, _ in events))
        assert len(full) + counted == sum(k == kind for _, k, _ in events)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match=r"first_lines=-1"):
        ConsoleConfig(first_lines=-1)
    with pytest.raises(ValueError, match=r"note_every=0"):
        ConsoleConfig(note_every=0)


def test_without_logging_configured_keel_prints_to_stderr(monkeypatch, capfd):
    root, logger = logging.getLogger(), logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(root, "handlers", [])  # as in a script that never configured logging
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    logger.manager._clear_cache()
    try:
        Console().step(Decision(step=7, findings=(_finding(7, severity="critical"),)))
        Console().summary(
            status="finished",
            steps=8,
            policy="skip",
            findings=[_finding(7, severity="critical")],
            decisions=[],
            diagnoses=[],
            run_dir=None,
        )
    finally:
        logger.manager._clear_cache()
    err = capfd.readouterr().err
    assert "keel: step 7 loss_spike critical" in err, err
    assert "keel: run finished after 8 steps" in err, err
    assert len(logger.handlers) == 1  # one handler, added once


def test_with_logging_configured_keel_adds_no_handler(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)  # pytest's handler on the root: the application's
    before = list(logging.getLogger(LOGGER_NAME).handlers)
    Console().step(Decision(step=1, findings=(_finding(1),)))
    assert logging.getLogger(LOGGER_NAME).handlers == before
    assert [r.getMessage()[:20] for r in _keel_lines(caplog)] == ["step 1 loss_spike wa"]


def test_silenced_keeps_a_run_quiet_and_leaves_the_level_as_it_was(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    with silenced():
        _nan_loss_run(None, steps=26)
        Console().step(Decision(step=1, findings=(_finding(1, severity="critical"),)))
    assert _keel_lines(caplog) == []
    assert logging.getLogger(LOGGER_NAME).level == logging.DEBUG
    Console().step(Decision(step=1, findings=(_finding(1, severity="critical"),)))
    assert len(_keel_lines(caplog)) == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_stderr_only_with_keel_lines_above_it(monkeypatch, capsys):
    root, logger = logging.getLogger(), logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger.manager._clear_cache()
    try:
        with progress_bar(3, "work", unit="run") as bar:
            bar.update()
            Console().step(Decision(step=1, action="abort", reason="rollbacks keep repeating"))
            bar.update(2)
        handlers = list(logger.handlers)
        with progress_bar(3, "off", enabled=False) as bar:  # --json: no bar at all
            bar.update(3)
    finally:
        logger.manager._clear_cache()
    assert capsys.readouterr().out == ""  # stdout stays clean for --json
    text = terminal.getvalue()
    assert "work:  33%" in text and "off" not in text, text
    assert "keel: step 1 abort: rollbacks keep repeating\n" in text, text
    assert [type(h).__name__ for h in handlers] == ["_StderrHandler"]  # keel's handler back after the bar


HOSTILE = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["\x1b[2J\x1b[H", "loss\r\nstep 0 abort: forged", "\u202egnirts", "a\tb\x00c", ""]
)


@settings(max_examples=60, deadline=None)
@given(
    kind=HOSTILE,
    signal=HOSTILE,
    cause=HOSTILE,
    advice=HOSTILE,
    reason=HOSTILE,
    value=st.floats() | st.integers() | st.just("text"),
    severity=st.sampled_from(["info", "warning", "critical"]),
)
def test_hostile_finding_text_is_one_printable_line(kind, signal, cause, advice, reason, value, severity):
    shown: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record)

    logger, handler = logging.getLogger(LOGGER_NAME), Catch(logging.DEBUG)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    try:
        finding = Finding(step=3, kind=kind, severity=severity, signal=signal, value=value, cause=cause, advice=advice)
        Console().step(Decision(step=3, action="skip", reason=reason, findings=(finding,)))
        Console().summary(
            status=reason,
            steps=4,
            policy="skip",
            findings=[finding],
            decisions=[],
            diagnoses=[],
            run_dir=f"runs/{reason}",
        )
    finally:
        logger.removeHandler(handler)
        logger.level = level
    lines = [r.getMessage() for r in shown]
    assert len(lines) == 3
    assert all(m.isprintable() for m in lines[:2]), lines  # a finding line and a decision line, one line each
    assert all(part.isprintable() for part in lines[2].split("\n")) and lines[2].count("\n") <= 6


def test_a_console_that_fails_is_recorded_and_the_run_and_its_store_go_on(tmp_path, monkeypatch):
    def broken(self, decision):
        raise RuntimeError("console broke")

    monkeypatch.setattr(Console, "step", broken)
    guard = _nan_loss_run(tmp_path / "run")
    errors = [f for f in guard.findings if f.kind == "keel_error"]
    assert [e.signal for e in errors] == ["console"] and "console broke" in errors[0].cause
    assert any(d.action == "rollback" for d in guard.decisions)  # keel still protected the run
    from keel.store import RunReader

    with RunReader(tmp_path / "run") as reader:
        kinds = {f.kind for f in reader.findings()}
        assert {"keel_error", "non_finite"} <= kinds and reader.meta()["status"] == "finished"


@pytest.mark.parametrize(("rank", "quiet"), [(0, False), (1, True)])
def test_under_torch_distributed_only_rank_0_speaks(monkeypatch, rank, quiet):
    from keel.guard.recorder import Recorder

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    assert Recorder(None, 50).console.quiet is quiet


@pytest.mark.parametrize(
    ("policy", "shown"),
    [
        ("recover", "Skip this update (keel does so under policy='recover')"),
        ("skip", "Skip this update (keel does so under policy='skip')"),
        ("observe", "Skip this update (policy='skip')"),
    ],
)
def test_the_nan_advice_names_the_policy_in_force(policy, shown, caplog):
    """timm's train.py under keel.watch(policy='recover') printed "advice: Skip this update (policy='skip')" while keel
    skipped that update itself: advice that names a policy the run already has now says keel does it."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with Guard(model, opt, policy=policy) as guard:
        x, y = make_batches(1)[0]
        loss = F.mse_loss(model(x), y) * float("nan")
        loss.backward()
        guard.step(loss)
    lines = [r.getMessage() for r in _keel_lines(caplog)]
    [line] = [line for line in lines if "non_finite critical" in line]
    assert f"advice: {shown}." in line, line
    [summary] = [line for line in lines if "cause 1:" in line]  # the diagnosis's advice reads the same way
    in_force = "keel does so under policy='" if policy != "observe" else "policy='"
    assert f"advice: skip the update when the gradients are non-finite ({in_force}" in summary, summary


def test_advice_in_force_rewrites_only_policies_the_run_has():
    from keel.guard.summary import advice_in_force

    both = "skip it (policy='skip'), roll back (policy='recover')"
    assert advice_in_force(both, "skip") == "skip it (keel does so under policy='skip'), roll back (policy='recover')"
    assert advice_in_force(both, "recover") == (
        "skip it (keel does so under policy='recover'), roll back (keel does so under policy='recover')"
    )
    assert advice_in_force(both, "observe") == advice_in_force(both, None) == both
