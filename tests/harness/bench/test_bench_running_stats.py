"""`keel bench running-stats`: the figures it reports are the ones it measured."""

from __future__ import annotations

import argparse
import json

from keel.harness.bench import running_stats


def test_the_resnet50_layout_and_a_short_run_give_well_formed_figures(capsys) -> None:
    assert len(running_stats.RESNET50_BN) == 53 and sum(running_stats.RESNET50_BN) == 26_560  # torchvision's resnet50
    args = argparse.Namespace(repeats=2, steps=2, json=True)
    assert running_stats.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    copy, step = result["copy"], result["cnn_skip_step"]
    assert copy["layers"] == 53 and copy["values"] == 2 * 26_560 + 53  # mean and variance per channel, a count each
    assert copy["save_us"] > 0 and copy["restore_us"] > 0
    assert len(step["ratios"]) == 2 and step["ratio"] > 0 and step["step_ms_off"] > 0 and step["step_ms_kept"] > 0
