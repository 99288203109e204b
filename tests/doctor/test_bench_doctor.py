"""`keel bench doctor` (src/keel/bench/doctor.py) on a tiny labelled folder built here."""

import argparse
import json

import numpy as np

from keel.bench import doctor as bench


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    healthy = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(100)]
    event = [2.0 * (1 + 0.02 * rng.standard_normal()) for _ in range(40)] + [6.0, 6.2, 6.1]
    for name, losses in (("healthy.csv", healthy), ("spike.csv", event)):
        (tmp_path / name).write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in enumerate(losses)))
    labels = {"series": [{"file": "healthy.csv", "label": "healthy", "spike_steps": []},
                         {"file": "spike.csv", "label": "spike", "spike_steps": [40, 41, 42]},
                         {"file": "missing.csv", "label": "spike", "spike_steps": [1]}]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    return tmp_path


def test_scores_as_json(tmp_path, capsys):
    args = argparse.Namespace(data=_folder(tmp_path), json=True)
    assert bench.main(args) == 0
    scores = {s["file"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(scores) == {"healthy.csv", "spike.csv"}  # a listed file that is absent is left out
    assert (scores["healthy.csv"]["warnings"], scores["healthy.csv"]["criticals"]) == (0, 0)
    spike = scores["spike.csv"]
    assert spike["context"] == 40 and spike["detected"] is True
    assert spike["detected_by"] == "40 loss_spike critical" and spike["early_alarms"] == 0
    assert spike["prefixed"] == {}  # no llm.c log in this folder: no prefix run


def test_markdown_and_missing_labels(tmp_path, capsys):
    assert bench.main(argparse.Namespace(data=_folder(tmp_path), json=False)) == 0
    out = capsys.readouterr().out
    assert "| `healthy.csv` | healthy | 100 | 1 | 0 | 0 | 0 |" in out
    assert "| `spike.csv` | spike | 43 | 40 | 40 loss_spike critical | 0 | none |" in out
    assert bench.main(argparse.Namespace(data=tmp_path / "nowhere", json=False)) == 2
    assert "no labels.json" in capsys.readouterr().err
