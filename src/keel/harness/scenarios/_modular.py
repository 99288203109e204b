"""Modular arithmetic, the grokking setting (Prieto et al. 2025), as a guarded full-batch training run.

(a ∘ b) mod p from one-hot pairs, an MLP with two hidden layers of 200 and no biases, full-batch AdamW
(lr 0.01, β (0.9, 0.99), no weight decay) on 40 % of the pairs: the reference setup
(``grokking_experiments.py`` in LucasPrietoAl/grokking-at-the-edge-of-numerical-stability), with p = 59
instead of 113 to fit a CPU minute. The output layer works in float16 (as under fp16 autocast) and the
loss is computed with the log-softmax in a chosen precision (the reference's
``cross_entropy_float{16,32,64}``). The training set is fit within ~50 steps; after that the cheapest way
to lower the loss is to scale the logits up (naïve loss minimisation).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel.detect import default_detectors
from keel.guard import Guard
from keel.harness.scenarios._common import ScenarioResult
from keel.losses.z_loss import z_loss as zloss
from keel.signals import TRANSFORMER_PROBES, Probe
from keel.signals.grad_weight_cos import GradWeightCosProbe
from keel.signals.output_logits import OutputLogitsProbe

P = 59
OPS = {"add": lambda a, b: (a + b) % P, "product": lambda a, b: (a * b) % P}


class HalfHead(nn.Linear):
    """A linear layer computed in float16 (what fp16 autocast does to an output layer)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.half(), self.weight.half())


def build(seed: int, op: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    a, b = (t.flatten() for t in torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij"))
    x = torch.cat([F.one_hot(a, P), F.one_hot(b, P)], dim=1).float()
    y = OPS[op](a, b)
    train = torch.randperm(len(y))[: int(0.4 * len(y))]
    model = nn.Sequential(
        nn.Linear(2 * P, 200, bias=False),
        nn.ReLU(),
        nn.Linear(200, 200, bias=False),
        nn.ReLU(),
        HalfHead(200, P, bias=False),
    )
    return model, x[train], y[train]


def loss_in(logits: Tensor, targets: Tensor, precision: torch.dtype, z_loss: float = 0.0) -> Tensor:
    """Cross-entropy with the log-softmax in ``precision``, plus an optional z-loss on the float32 logits."""
    logp = F.log_softmax(logits.to(precision), dim=-1)
    loss = -logp.gather(1, targets[:, None]).float().mean()
    if z_loss:
        loss = loss + zloss(logits.float(), coefficient=z_loss)
    return loss


def train(
    name: str,
    *,
    seed: int,
    steps: int,
    precision: torch.dtype,
    eps: float,
    op: str = "add",
    z_loss: float = 0.0,
    guarded: bool = True,
) -> ScenarioResult:
    """One full-batch run; under an observing `Guard` with the default probes (plus the gradient–weight cosine)."""
    model, x, y = build(seed, op)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=eps, weight_decay=0.0)
    logits_probe = OutputLogitsProbe()  # given the targets, it also measures the zero-loss fraction
    probes: list[str | Probe] = [p for p in TRANSFORMER_PROBES if p != "output_logits"]
    probes += [logits_probe, GradWeightCosProbe(every=10)]
    guard = Guard(model, optimizer, policy="observe", probes=probes, detectors=default_detectors()) if guarded else None
    g = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        order = torch.randperm(len(y), generator=g)  # full batch, shuffled as the reference does
        logits_probe.set_targets(y[order])
        loss = loss_in(model(x[order]), y[order], precision, z_loss)
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    findings = []
    if guard is not None:
        guard.close()
        findings = list(guard.findings)
    return ScenarioResult(name=name, losses=losses, findings=findings, wall_s=time.perf_counter() - start)
