import json

import pytest

from keel.cli import main

ARGS = [
    "sweep",
    "--sizes",
    "tiny",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--warmup",
    "2",
    "--eval-batches",
    "1",
    "--workers",
    "1",
    "--recipes",
    "baseline",
    "qk_norm",
    "--lrs",
    "1e-2",
    "3e-2",
]


def test_sweep_json_summary_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main([*ARGS, "--out", str(out), "--json", "--no-plots"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "[4/4]" in captured.err  # progress goes to stderr when stdout is JSON
    entries = {(e["name"], e["size"]): e for e in doc["recipes"]}
    assert set(entries) == {("baseline", "tiny"), ("qk_norm", "tiny")} and doc["runs"] == {"done": 4}
    for entry in entries.values():
        assert {"lr_sensitivity", "best_lr", "best_loss", "lr_range", "max_attn_logit", "log_z"} <= set(entry)
        assert entry["best_lr"] in (1e-2, 3e-2) and entry["lr_sensitivity"] >= 0
        assert entry["router_z"] == entry["load_imbalance"] == entry["dead_experts"] == [None, None]  # dense: none
        assert entry["best_loss"] == min(entry["losses"]) and len(entry["max_attn_logit"]) == 2
    assert entries[("baseline", "tiny")]["sensitivity_vs_baseline"] == 1.0
    assert not (out / "plots").exists()

    assert main([*ARGS, "--out", str(out), "--no-plots"]) == 0  # same grid again: a resume that runs nothing
    text = capsys.readouterr().out
    assert "resumed: 4 runs were already finished, 0 ran now" in text and "baseline\n  size" in text
    assert "router" not in text  # no MoE recipe: no router table

    assert main(["sweep", "--out", str(out), "--summarize", "--json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["recipes"] == doc["recipes"]

    # a sweep folder whose plots cannot be written (read-only, as a finished sweep copied from a cluster; here
    # OUT/plots is a file): the summary is still printed, exit 0 (reviewer V7: exit 2 and no table)
    (out / "plots").write_text("not a folder")
    assert main(["sweep", "--out", str(out), "--summarize"]) == 0
    text = capsys.readouterr().out
    assert "baseline\n  size" in text and ("plots not written" in text or "plots skipped" in text)


def test_quick_grid_is_what_help_says(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "--quick" in capsys.readouterr().out
