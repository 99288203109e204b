"""Record the weight-oscillation share of the zoo's QAT scenarios for the QAT-oscillation detector tests.

Run: ``.venv/bin/python tests/detect/data/record_qat_series.py`` (a few minutes on 2 CPU cores). Writes
``qat_series.json``: per run (``qat_oscillation`` and ``qat_healthy``, seeds 0–2), the steps and values of
``qat/oscillation`` as the default detectors saw them under the scenario's `Guard` (6 significant digits), and the
steps of the run's ``qat_oscillation`` findings.
"""

from __future__ import annotations

import json
from pathlib import Path

from _seen import run_seeing  # this folder: run as a script

from keel._core import keys
from keel.detect import qat_oscillation

RUNS = [(name, seed) for name in ("qat_oscillation", "qat_healthy") for seed in (0, 1, 2)]


def record(name: str, seed: int) -> dict[str, object]:
    result, seen = run_seeing(qat_oscillation.QatOscillationDetector, keys.QAT_OSCILLATION, name, seed)
    return {
        "steps": [s for s, _ in seen],
        "share": [float(f"{v:.6g}") for _, v in seen],
        "findings": [f.step for f in result.alarms() if f.kind == qat_oscillation.KIND],
    }


if __name__ == "__main__":
    out = {f"{name}/{seed}": record(name, seed) for name, seed in RUNS}
    path = Path(__file__).with_name("qat_series.json")
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")
