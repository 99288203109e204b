"""Record the activation signals of the zoo's fp16 scenarios for the activation-growth detector tests.

Run: ``.venv/bin/python tests/detect/data/record_activation_series.py`` (a few minutes on 2 CPU cores). Writes
``activation_series.json``: per run (``fp16_overflow`` and ``fp16_healthy``, seeds 0–2), the steps and values of
``act/max_abs`` as the default detectors saw them under the scenario's `Guard` (6 significant digits; a non-finite
value as null), and the first step whose loss was not finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from _seen import run_seeing  # this folder: run as a script

from keel._core import keys
from keel.detect import activation_growth

RUNS = [(name, seed) for name in ("fp16_overflow", "fp16_healthy") for seed in (0, 1, 2)]


def record(name: str, seed: int) -> dict[str, object]:
    result, seen = run_seeing(activation_growth.ActivationGrowthDetector, keys.ACT_MAX_ABS, name, seed)
    first_bad = next((i for i, v in enumerate(result.losses) if not math.isfinite(v)), None)
    return {
        "steps": [s for s, _ in seen],
        "act_max_abs": [float(f"{v:.6g}") if math.isfinite(v) else None for _, v in seen],
        "first_nonfinite_loss": first_bad,
    }


if __name__ == "__main__":
    out = {f"{name}/{seed}": record(name, seed) for name, seed in RUNS}
    path = Path(__file__).with_name("activation_series.json")
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path}")
