"""What the mixture-of-experts scenarios share: the proxy with MoE blocks, watched with the router probe.

Each is a proxy-LM scenario (`LMScenario`) whose recipe sets ``TrainConfig.moe``; the Guard gets keel's
transformer probes plus the router probe (`keel.signals.router`) and the default detectors plus the MoE ones,
wherever they are not in those sets already. It trains on one intra-op thread, restored after: the tiny proxy is
too small for a second thread to pay (the continual scenarios measured the same), and the zoo's budget is per
thread.
"""

from __future__ import annotations

import torch

from keel.detect import default_detectors
from keel.detect.detector import create_detector
from keel.harness.scenarios._common import LMScenario, ScenarioResult, _steps
from keel.proxy.trainer import train_proxy
from keel.signals import TRANSFORMER_PROBES

ROUTER_PROBE = "router"
MOE_DETECTORS = ("router_logit_growth", "load_collapse", "dead_experts")


def moe_probes() -> list[str]:
    """keel's transformer probe set with the router probe (once)."""
    return list(dict.fromkeys([*TRANSFORMER_PROBES, ROUTER_PROBE]))


def moe_detectors() -> list[object]:
    """`default_detectors` with each MoE detector it lacks."""
    detectors: list[object] = list(default_detectors())
    present = {type(d) for d in detectors}
    for name in MOE_DETECTORS:
        detector = create_detector(name)
        if type(detector) not in present:
            detectors.append(detector)
    return detectors


class MoeScenario(LMScenario):
    """A proxy-LM scenario on the MoE proxy: the recipe under an observing Guard with the router probe."""

    def run(self, *, seed: int = 0, steps: int | None = None) -> ScenarioResult:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run = train_proxy(
                _steps(self.recipe(seed), steps), policy="observe", probes=moe_probes(), detectors=moe_detectors()
            )
        finally:
            torch.set_num_threads(threads)
        return ScenarioResult(
            name=self.spec.name, losses=run.losses, findings=list(run.findings), wall_s=run.wall_s, event_step=None
        )

    def reference(self, *, seed: int = 0, steps: int | None = None) -> list[float] | None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().reference(seed=seed, steps=steps)
        finally:
            torch.set_num_threads(threads)
