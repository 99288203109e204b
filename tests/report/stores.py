"""Synthetic run stores for the report tests, written with the store's RunWriter (no torch, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from keel._core import Decision, Finding
from keel.store import RunWriter


def make_run_store(run_dir: Path, *, steps: int = 300, seed: int = 0, layers: int = 2,
                   spike_at: int | None = 150, skip_at: int | None = 150,
                   rollback: tuple[int, int] | None = None, nan_at: int | None = None,
                   snapshot_every: int = 100, policy: str = "skip", per_param: bool = True) -> Path:
    """A run store with loss, grad/norm, lr, per-layer attention and logits signals, findings and decisions.

    Args:
        spike_at: Step of a loss spike (×4) with a critical ``loss_spike`` finding.
        skip_at: Step of a recorded skip decision.
        rollback: (restored_step, step) of a recorded rollback.
        nan_at: Step with a NaN loss and a ``non_finite`` finding.
    """
    rng = np.random.default_rng(seed)
    with RunWriter(run_dir, flush_interval=0.2) as w:
        w.set_meta({"status": "finished", "policy": policy, "steps": steps, "seed": seed,
                    "config": {"lr": 3e-3, "size": "tiny", "note": "<b>not markup</b>"},
                    "versions": {"torch": "x", "python": "3"}, "git_sha": "abc123"})
        for step in range(steps):
            loss = 2.0 + 3.0 * math.exp(-step / (steps / 5)) + 0.05 * rng.standard_normal()
            if step == spike_at:
                loss *= 4
            if step == nan_at:
                loss = math.nan
            values = {"loss": loss, "grad/norm": float(np.exp(0.1 * rng.standard_normal())),
                      "lr": 1e-3 * min(1.0, (step + 1) / 20), "time/step": 0.01,
                      "attn/max_logit": 5.0 + step / steps * 10, "logits/log_z": 0.1 * step / steps}
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
            findings.append(Finding(step=spike_at, kind="loss_spike", severity="critical", signal="loss",
                                    value=8.0, baseline=2.0, evidence={"z": 40.0, "ratio": 4.0},
                                    cause="The loss jumped to 4× its median <script>alert(1)</script>.",
                                    remedy="Skip this update."))
            findings.append(Finding(step=spike_at - 20, kind="loss_spike", severity="info", signal="loss",
                                    value=2.5, baseline=2.0, cause="One outlier batch."))
        if nan_at is not None:
            findings.append(Finding(step=nan_at, kind="non_finite", severity="critical", signal="loss",
                                    evidence={"non_finite": ["loss"]}, cause="Non-finite loss.",
                                    remedy="Skip."))
        findings.append(Finding(step=steps // 2, kind="attention_logit_growth", severity="warning",
                                signal="attn/max_logit", value=10.0, baseline=5.0,
                                evidence={"rate_per_step": 0.01, "remedies": [
                                    {"rank": 1, "action": "add QK-norm", "how": "keel.nn QK-norm",
                                     "source": "Dehghani et al. 2023"}]},
                                cause="Attention logits grow.", remedy="Add QK-norm."))
        w.add_findings(findings)
        if skip_at is not None:
            w.add_decision(Decision(step=skip_at, action="skip", reason="critical loss_spike"))
        if rollback is not None:
            restored, at = rollback
            w.add_decision(Decision(step=at, action="rollback", reason="divergence; data window not replayed",
                                    onset=restored + 5, restored_step=restored))
        # RunWriter.close() waits 60 s for its thread; a 100k-step store on a loaded machine needs longer.
        w.flush(timeout=1800)
    return run_dir
