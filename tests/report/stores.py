"""Synthetic run stores for the report tests, written with the store's RunWriter (no torch, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from keel._core import Decision, Finding
from keel.store import RunWriter


def make_run_store(
    run_dir: Path,
    *,
    steps: int = 300,
    seed: int = 0,
    layers: int = 2,
    spike_at: int | None = 150,
    skip_at: int | None = 150,
    rollback: tuple[int, int] | None = None,
    nan_at: int | None = None,
    snapshot_every: int = 100,
    policy: str = "skip",
    per_param: bool = True,
) -> Path:
    """A run store with loss, grad/norm, lr, per-layer attention and logits signals, findings and decisions.

    Args:
        spike_at: Step of a loss spike (×4) with a critical ``loss_spike`` finding.
        skip_at: Step of a recorded skip decision.
        rollback: (restored_step, step) of a recorded rollback.
        nan_at: Step with a NaN loss and a ``non_finite`` finding.
    """
    rng = np.random.default_rng(seed)
    with RunWriter(run_dir, flush_interval=0.2) as w:
        w.set_meta(
            {
                "status": "finished",
                "policy": policy,
                "steps": steps,
                "seed": seed,
                "config": {"lr": 3e-3, "size": "tiny", "note": "<b>not markup</b>"},
                "versions": {"torch": "x", "python": "3"},
                "git_sha": "abc123",
            }
        )
        for step in range(steps):
            loss = 2.0 + 3.0 * math.exp(-step / (steps / 5)) + 0.05 * rng.standard_normal()
            if step == spike_at:
                loss *= 4
            if step == nan_at:
                loss = math.nan
            values = {
                "loss": loss,
                "grad/norm": float(np.exp(0.1 * rng.standard_normal())),
                "lr": 1e-3 * min(1.0, (step + 1) / 20),
                "time/step": 0.01,
                "attn/max_logit": 5.0 + step / steps * 10,
                "logits/log_z": 0.1 * step / steps,
            }
            for layer in range(layers):
                values[f"attn/max_logit/blocks.{layer}.attn"] = 4.0 + layer + step / steps * 10
            if per_param and step % 10 == 0:
                values["grad/norm/fc1.weight"] = 0.5
                values["grad/norm/fc2.weight"] = 0.7
            w.add_signals(step, values)
            if snapshot_every and step % snapshot_every == 0:
                w.add_snapshot(step, f"{run_dir}/snapshots/{step}.safetensors", f"{step:064x}")
        findings = []
        if spike_at is not None:
            findings.append(
                Finding(
                    step=spike_at,
                    kind="loss_spike",
                    severity="critical",
                    signal="loss",
                    value=8.0,
                    baseline=2.0,
                    evidence={"z": 40.0, "ratio": 4.0},
                    cause="The loss jumped to 4× its median <script>alert(1)</script>.",
                    advice="Skip this update.",
                )
            )
            findings.append(
                Finding(
                    step=spike_at - 20,
                    kind="loss_spike",
                    severity="info",
                    signal="loss",
                    value=2.5,
                    baseline=2.0,
                    cause="One outlier batch.",
                )
            )
        if nan_at is not None:
            findings.append(
                Finding(
                    step=nan_at,
                    kind="non_finite",
                    severity="critical",
                    signal="loss",
                    evidence={"non_finite": ["loss"]},
                    cause="Non-finite loss.",
                    advice="Skip.",
                )
            )
        findings.append(
            Finding(
                step=steps // 2,
                kind="attention_logit_growth",
                severity="warning",
                signal="attn/max_logit",
                value=10.0,
                baseline=5.0,
                evidence={
                    "rate_per_step": 0.01,
                    "advice": [
                        {"rank": 1, "action": "add QK-norm", "how": "keel.nn QK-norm", "source": "Dehghani et al. 2023"}
                    ],
                },
                cause="Attention logits grow.",
                advice="Add QK-norm.",
            )
        )
        w.add_findings(findings)
        if skip_at is not None:
            w.add_decision(Decision(step=skip_at, action="skip", reason="critical loss_spike"))
        if rollback is not None:
            restored, at = rollback
            w.add_decision(
                Decision(
                    step=at,
                    action="rollback",
                    reason="divergence; data window not replayed",
                    onset=restored + 5,
                    restored_step=restored,
                )
            )
        # RunWriter.close() waits 60 s for its thread; a 100k-step store on a loaded machine needs longer.
        w.flush(timeout=1800)
    return run_dir


SWEEP_RUNS = [  # recipe, size, lr, status, val_loss, max_attn_logit
    ("baseline", "tiny", 1e-3, "done", 2.47, 4.9),
    ("baseline", "tiny", 1e-1, "done", 2.93, 6.7e4),
    ("baseline", "small", 1e-3, "done", 2.28, 7.2),
    ("baseline", "small", 1e-1, "diverged", None, 2.1e5),
    ("qk_norm", "tiny", 1e-3, "done", 2.46, 5.2),
    ("qk_norm", "tiny", 1e-1, "done", 2.57, 21.0),
    ("qk_norm", "small", 1e-3, "done", 2.27, 5.5),
    ("qk_norm", "small", 1e-1, "error", None, None),
]
SIZES = {"tiny": 115_328, "small": 427_264}


def sweep_summary() -> dict:
    """The summary `keel sweep` stores for `SWEEP_RUNS` (the ``keel sweep --json`` document, numbers by hand)."""

    def curve(recipe, size, losses, logits, lrs_range, sensitivity, ratio, diverged=0, errors=0):
        return {
            "name": recipe,
            "size": size,
            "n_params": SIZES[size],
            "lr_sensitivity": sensitivity,
            "best_lr": 1e-3,
            "best_loss": losses[0],
            "init_loss": 5.6,
            "lr_range": lrs_range,
            "sensitivity_vs_baseline": ratio,
            "lrs": [1e-3, 1e-1],
            "losses": losses,
            "max_attn_logit": logits,
            "log_z": [5.7, 5.1],
            "grad_norm": [0.98, 0.14],
            "runs": 2,
            "diverged": diverged,
            "errors": errors,
        }

    def view(recipe, logits, exponent, prefactor, reach):
        return {
            "recipe": recipe,
            "lr": 1e-3,
            "sizes": ["tiny", "small"],
            "n_params": list(SIZES.values()),
            "max_attn_logit": logits,
            "grad_norm": [0.98, 0.99],
            "logit_exponent": exponent,
            "grad_norm_exponent": 0.0,
            "logit_log10_prefactor": prefactor,
            "grad_norm_log10_prefactor": 0.0,
            "divergence_logit": 124.0,
            "threshold_source": "calibrated on baseline",
            "predicted_divergence_params": 7.6e9,
            "reach": reach,
        }

    return {
        "recipes": [
            curve("baseline", "tiny", [2.47, 2.93], [4.9, 6.7e4], [1e-3, 1e-3], 0.23, 1.0),
            curve("baseline", "small", [2.28, 5.6], [7.2, 2.1e5], [1e-3, 1e-3], 1.66, 1.0, diverged=1),
            curve("qk_norm", "tiny", [2.46, 2.57], [5.2, 21.0], [1e-3, 1e-1], 0.055, 4.2),
            curve("qk_norm", "small", [2.27], [5.5], [1e-3, 1e-3], 0.0, None, errors=1)
            | {"lrs": [1e-3], "log_z": [6.2], "grad_norm": [1.1], "runs": 1},
        ],
        "scaling": [
            view("baseline", [4.9, 7.2], 0.29, -0.78, "reaches 124 (calibrated on baseline) at ≈7.6e+09 params"),
            view(
                "qk_norm",
                [5.2, 5.5],
                0.04,
                0.5,
                "practically flat: reaches 124 (calibrated on baseline) only at ≈1e+38 params",
            ),
        ],
        "runs": {"done": 6, "diverged": 1, "error": 1},
    }


def make_sweep_store(sweep_dir: Path, *, runs=SWEEP_RUNS, summary: dict | None = None) -> Path:
    """A sweep store as `keel sweep` leaves it (rows and summary), written with SQL only (no torch, no proxy)."""
    import json
    import sqlite3

    from keel.store.sweep_schema import SUMMARY_KEY, SWEEP_DDL

    sweep_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(sweep_dir / "sweep.sqlite")
    conn.executescript(SWEEP_DDL)
    conn.executemany(
        "INSERT INTO runs (run_id, recipe, size, lr, seed, status, config, val_loss, max_attn_logit, n_params, "
        "steps_done, wall_s, error, run_dir, attempts) VALUES (?, ?, ?, ?, 0, ?, '{}', ?, ?, ?, 300, 40.0, ?, ?, 1)",
        [
            (
                f"{r}/{s}/lr={lr}/seed=0",
                r,
                s,
                lr,
                status,
                loss,
                logit,
                SIZES[s],
                "Traceback ...\nRuntimeError: boom" if status == "error" else None,
                f"runs/{r}/{s}/lr={lr}/seed=0",
            )
            for r, s, lr, status, loss, logit in runs
        ],
    )
    meta = {"sweep": {"recipes": ["baseline", "qk_norm"], "steps": 300}, "git_sha": "abc"}
    if summary is not None:
        meta[SUMMARY_KEY] = summary
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    conn.commit()
    conn.close()
    return sweep_dir
