"""`keel bench detect --probe-costs`'s component rows: stabilizers, the minmax int4 grid, losses, ALLoRA and Guard
options, each against its own baseline; ``--group`` picks rows and brings their baselines along."""

from __future__ import annotations

import itertools

import pytest

from keel.cli import main
from keel.harness.bench import detect
from keel.harness.bench._component_costs import GROUPS, ROWS, selected_rows
from keel.harness.bench.loop import train_steps


def test_every_row_is_measured_against_rows_of_the_table():
    for name, row in ROWS.items():
        assert row.group in GROUPS and row.bare in ROWS and row.foundation in ROWS, name


def test_every_group_selection_brings_every_baseline_its_rows_are_measured_against():
    # all 127 selections (a property test drew {qat} first: "bare" came in as qat bare's baseline without its own)
    for k in range(1, len(GROUPS) + 1):
        for groups in itertools.combinations(GROUPS, k):
            rows = selected_rows(groups)
            assert {n for n, r in ROWS.items() if r.group in groups} <= set(rows)
            for name in rows:
                assert ROWS[name].bare in rows and ROWS[name].foundation in rows, (groups, name)
            assert rows == [n for n in ROWS if n in rows]  # table order, no duplicates


def test_no_group_means_every_row():
    assert selected_rows(None) == list(ROWS)


def test_an_unknown_group_names_the_allowed():
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['nope'\]; allowed: probes, guard"):
        selected_rows(("nope",))


def _run(argv, capsys, monkeypatch):
    def never(**kwargs):  # validation must come before minutes of timing
        raise AssertionError("probe_costs ran on a refused command line")

    monkeypatch.setattr(detect, "probe_costs", never)
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "argv, names",
    [
        (["bench", "detect", "--probe-costs", "--group", "nope"], ["nope", "stabilizers"]),
        (["bench", "detect", "--group", "lora"], ["--group", "--probe-costs"]),  # a --probe-costs option alone
    ],
)
def test_a_bad_group_is_one_error_line_and_exit_2(argv, names, capsys, monkeypatch):
    code, captured = _run(argv, capsys, monkeypatch)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and captured.out == "", captured
    assert all(n in lines[0] for n in names), lines[0]


def test_train_steps_refuses_a_loss_fn_beside_example_signals():
    with pytest.raises(ValueError, match="loss_fn and example_signals together; allowed: one of them"):
        train_steps(None, None, [], None, 0, loss_fn=lambda x, y: x, example_signals=lambda losses: {})


@pytest.mark.slow
def test_the_component_rows_are_timed_against_their_own_baselines():
    groups = ("guard", "moe", "qat", "stabilizers", "losses", "lora")
    costs = detect.probe_costs(steps=1, repeats=1, threads=1, groups=groups)
    timed = set(costs["cpu_ms_per_step"]) | set(costs["skipped"])
    assert timed == set(selected_rows(groups))
    for name in ("guard max_grad_norm=1", "guard sync=deferred", "update_ratio", "quantizer minmax int4"):
        assert name in costs["cpu_ms_per_step"], name
    for base in ("bare", "moe bare", "qat bare", "lora bare"):
        if base in costs["ratio_to_bare"]:
            assert costs["ratio_to_bare"][base] == 1.0 or base == "qat bare"  # qat bare: fake quantization's cost
    assert costs["against"]["loss teacher_intervention"] == ["qat bare", "qat bare"]
    assert costs["against"]["stabilizer momentum_smoe"] == ["moe bare", "moe bare"]
    assert costs["sharpness"] == {}  # timed with the probes group only
    assert all(v > 0 for v in costs["cpu_ms_per_step"].values())


def _one_step(name: str):
    """One step of a component row's loop, as `probe_costs` builds and runs it; returns the loop's parts."""
    import torch

    from keel.guard import Guard
    from keel.harness.bench._component_costs import component_loop

    model, opt, kwargs, loss_fn, scaler = component_loop(name, "tiny", ["loss", "grad_norm", "param_norm"])
    guard = Guard(model, opt, policy="observe", **kwargs) if kwargs is not None else None
    before = [p.detach().clone() for p in model.parameters()]
    # 64 tokens: the calibrated scale_long gate is built for the U-ViT's 64; random, not the corpus (seconds to load)
    tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    train_steps(model, opt, [(tokens[:, :-1], tokens[:, 1:])], guard, 2, loss_fn=loss_fn, scaler=scaler)
    moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    return model, guard, scaler, moved


def test_the_fp16_rows_train_through_a_grad_scaler_the_bare_loop_steps_itself_and_the_guard_is_given():
    import torch

    model, guard, scaler, moved = _one_step("fp16 bare")
    assert guard is None and moved and scaler.get_scale() > 0
    assert scaler._growth_tracker.item() == 2  # two finite steps: the bare loop called scaler.update() each time
    model, guard, scaler, moved = _one_step("guard scaler (fp16)")
    assert guard is not None and guard.scaler is scaler and moved
    assert scaler._growth_tracker.item() == 2  # Guard.step stepped and updated the scaler it was given
    guard.close()
    assert next(model.parameters()).dtype == torch.float32  # autocast: the parameters stay float32


def test_the_scale_long_rows_hook_the_u_vit_decoder_the_bare_row_does_not():
    bare, _, _, moved = _one_step("unet bare")
    assert moved and all(not b._forward_pre_hooks for b in bare.out_blocks)
    scaled, _, _, moved = _one_step("stabilizer scale_long")
    assert moved and all(len(b._forward_pre_hooks) == 1 for b in scaled.out_blocks)
    calibrated, _, _, moved = _one_step("stabilizer scale_long (calibrated)")
    assert moved and hasattr(calibrated, "long_skip_calibration")
