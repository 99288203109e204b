"""Guard with batch ids, attribution, the skip list and replay (issue 17): what a user's loop sees end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import keel
from keel.data import SkipList, SkipListSampler
from keel.recover import RecoveryConfig

N, BATCH, POISONED = 640, 16, 486  # batch 30 (step 30) holds the poisoned example


def _data(scale: float = 300.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=gen)
    y = x[:, :4].argmax(1)
    x[POISONED] *= scale  # one extreme example: its loss and gradient dwarf the batch's
    return x, y


def _per_example(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _train(
    run_dir: Path | None,
    *,
    policy: str = "skip",
    attribution: keel.Attribution | None = None,
    recovery: RecoveryConfig | None = None,
    corrupt_step: int | None = None,
    loss_fn=_per_example,
    scale: float = 300.0,
) -> keel.Guard:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data(scale)
    guard = keel.Guard(
        model,
        opt,
        run_dir=None if run_dir is None else str(run_dir),
        policy=policy,
        attribution=attribution,
        recovery=recovery,
    )
    for step, start in enumerate(range(0, N, BATCH)):
        ids = range(start, start + BATCH)
        batch = (x[start : start + BATCH], y[start : start + BATCH])
        loss = loss_fn(model, batch).mean()
        loss.backward()
        if step == corrupt_step:  # a fault in this computation only: the same batch recomputed is fine
            for p in model.parameters():
                p.grad.mul_(1e4)  # type: ignore[union-attr]
        guard.step(loss, batch_ids=ids, batch=batch)
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard


def _skip_list(run_dir: Path) -> list[dict]:
    path = run_dir / "skip_list.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def test_batch_ids_are_stored_per_step_as_ranges(tmp_path: Path) -> None:
    _train(tmp_path, policy="observe")
    with keel.RunReader(tmp_path) as reader:
        batches = reader.batches()
    assert batches[0] == list(range(BATCH)) and batches[30] == list(range(30 * BATCH, 31 * BATCH))
    assert len(batches) == N // BATCH


def test_a_spike_is_attributed_to_the_poisoned_example_and_skip_listed(tmp_path: Path) -> None:
    guard = _train(tmp_path, attribution=keel.Attribution(loss_fn=_per_example, top_k=3))
    attributed = [f for f in guard.findings if "offenders" in f.evidence]
    assert attributed and all(f.step == 30 for f in attributed)
    top = attributed[0].evidence["offenders"][0]
    assert top["id"] == POISONED and top["outlier"]
    assert [o["outlier"] for o in attributed[0].evidence["offenders"][1:]] == [False, False]
    entries = _skip_list(tmp_path)
    assert [(e["kind"], e["ids"], e["first_step"]) for e in entries] == [("examples", str(POISONED), 30)]
    assert POISONED not in list(SkipListSampler(range(N), tmp_path))


def test_observe_attributes_but_writes_no_skip_list(tmp_path: Path) -> None:
    guard = _train(tmp_path, policy="observe", attribution=keel.Attribution(loss_fn=_per_example))
    assert any(f.evidence.get("offenders", [{}])[0].get("id") == POISONED for f in guard.findings)
    assert not (tmp_path / "skip_list.json").exists()


def test_a_rollback_writes_its_window_to_the_skip_list(tmp_path: Path) -> None:
    # three non-finite steps in a row: skips run out (cap 1) and the run rolls back past them
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    run = tmp_path / "rollback"
    with keel.Guard(model, opt, run_dir=str(run), policy="recover", max_consecutive_skips=1) as guard:
        for step, start in enumerate(range(0, N, BATCH)):
            loss = _per_example(model, (x[start : start + BATCH], y[start : start + BATCH])).mean()
            loss.backward()
            if 26 <= step < 29:
                for p in model.parameters():
                    p.grad.fill_(float("nan"))  # type: ignore[union-attr]
            guard.step(loss, batch_ids=range(start, start + BATCH))
            opt.zero_grad(set_to_none=True)
    rollbacks = [d for d in guard.decisions if d.action == "rollback"]
    assert rollbacks
    windows = [e for e in _skip_list(run) if e["kind"] == "window"]
    assert len(windows) == len(rollbacks)
    first = rollbacks[0]
    assert (windows[0]["first_step"], windows[0]["last_step"]) == (first.restored_step, first.step)
    expected = range(first.restored_step * BATCH, (first.step + 1) * BATCH)
    assert SkipList(run).entries[0].ids == tuple(expected)


def test_a_failing_attribution_is_recorded_and_training_goes_on(tmp_path: Path) -> None:
    calls = []

    def broken(model: torch.nn.Module, batch: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("user loss_fn broke")

    guard = _train(tmp_path, attribution=keel.Attribution(loss_fn=broken), loss_fn=_per_example)
    assert calls == [1]  # called on the bad step only, then switched off
    errors = [f for f in guard.findings if f.kind == "keel_error"]
    assert errors and "attribution" in errors[0].evidence.get("component", errors[0].signal)
    assert [d.action for d in guard.decisions] == ["skip"]  # the spike is still skipped
    assert guard.global_step == N // BATCH


def test_replay_names_a_transient_fault_and_keeps_the_data(tmp_path: Path) -> None:
    x, _ = _data()
    assert x[POISONED].abs().max() > 100  # the poisoned example is there; this run must not blame it
    guard = _train(
        tmp_path,
        attribution=keel.Attribution(loss_fn=_per_example),
        recovery=RecoveryConfig(replay=True),
        corrupt_step=24,
    )
    transient = [d for d in guard.decisions if d.step == 24]
    assert transient and transient[0].action == "skip" and transient[0].reason.startswith("transient fault")
    replay = next(f.evidence["replay"] for f in transient[0].findings if "replay" in f.evidence)
    assert not replay["reproducible"] and replay["grad_norm"] > 100 * replay["replay_grad_norm"]
    entries = _skip_list(tmp_path)
    assert all(e["first_step"] != 24 for e in entries)  # nothing of the faulty step is skip-listed
    data = [f for f in guard.findings if f.step == 30 and "replay" in f.evidence]
    assert data and data[0].evidence["replay"]["reproducible"]  # the poisoned batch reproduces: data
    assert [e["first_step"] for e in entries] == [30]


def test_replay_and_attribution_arguments_are_checked() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="replay=True.*without attribution"):
        keel.Guard(model, opt, policy="skip", recovery=RecoveryConfig(replay=True))
    with pytest.raises(ValueError, match="attribution=.*allowed: None or a keel.Attribution"):
        keel.Guard(model, opt, attribution=_per_example)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync='deferred'"):
        keel.Guard(model, opt, sync="deferred", attribution=keel.Attribution(loss_fn=_per_example))
    with pytest.raises(ValueError, match="replay_rtol"):
        RecoveryConfig(replay=True, replay_rtol=0)


@pytest.mark.parametrize("bad", [[-1], [1.5], "0-3", [[1, 2]], torch.ones(2, 2, dtype=torch.long), [True]])
def test_bad_batch_ids_get_one_clear_error(bad: object) -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with keel.Guard(model, opt) as guard:
        model(torch.ones(1, 2)).sum().backward()
        with pytest.raises(ValueError, match="batch_ids"):
            guard.step(torch.tensor(1.0), batch_ids=bad)
        assert guard.global_step == 0  # nothing was stepped


def test_the_console_names_the_attributed_example(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="keel"):
        _train(tmp_path, attribution=keel.Attribution(loss_fn=_per_example))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 30 loss_spike")]
    assert lines and f"[example {POISONED}]" in lines[0]


def test_the_replay_forward_runs_with_keels_activation_hooks_quiet(tmp_path: Path) -> None:
    from keel.signals._hooks import hooks_active

    seen: list[bool] = []

    def watching(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(hooks_active())
        return _per_example(model, batch)

    _train(
        tmp_path, attribution=keel.Attribution(loss_fn=watching), recovery=RecoveryConfig(replay=True), loss_fn=watching
    )
    # the loop's own N // BATCH forwards with hooks active; the attribution and replay forwards of step 30 quiet
    assert seen.count(True) == N // BATCH and seen.count(False) >= 1


def test_an_info_spike_carried_by_an_outlier_example_is_skipped_and_skip_listed(tmp_path: Path) -> None:
    # a milder poison: the gradient spike stays below the detectors' critical ratio (info: one step, no alarm)
    guard = _train(tmp_path, attribution=keel.Attribution(loss_fn=_per_example), scale=15.0)
    assert [(f.step, f.kind, f.severity) for f in guard.findings] == [(30, "grad_spike", "info")]
    assert [(d.step, d.action) for d in guard.decisions] == [(30, "skip")]
    assert f"outlier example(s) {POISONED}" in guard.decisions[0].reason
    assert [(e["kind"], e["ids"]) for e in _skip_list(tmp_path)] == [("examples", str(POISONED))]


def test_without_attribution_the_same_info_spike_is_trained_on(tmp_path: Path) -> None:
    guard = _train(tmp_path, scale=15.0)
    assert [(f.step, f.severity) for f in guard.findings] == [(30, "info")] and not guard.decisions


def test_a_rollback_past_the_ids_kept_in_memory_says_which_steps_it_could_not_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel._core.decision import Decision
    from keel.guard import data_ledger

    monkeypatch.setattr(data_ledger, "MIN_RECENT_STEPS", 3)
    ledger = data_ledger.DataLedger(tmp_path, None, keep_steps=3)
    for step in range(6):
        ledger.note(step, range(10 * step, 10 * step + 2), None)
    ledger.record_skips(Decision(step=5, action="rollback", reason="divergence", restored_step=1))
    (entry,) = SkipList(tmp_path).entries
    assert entry.ids == (30, 31, 40, 41, 50, 51)  # steps 3-5: the ones still kept
    assert "ids of steps 1-2 no longer kept" in entry.reason
