"""A real `peft` LoRA fine-tune of the pre-trained tiny proxy: what the LoRA scenarios (and ALLoRA's comparison) share.

The base is keel's tiny proxy pre-trained on the corpus (`_finetune.pretrained_base`, cached per process and seed,
the base the other fine-tune scenarios use), frozen, with peft's LoRA adapters (``peft.get_peft_model``,
``LoraConfig(target_modules=...)``: A kaiming-uniform, B zero, ΔW = (α/r)·B·A) on every block linear. It
fine-tunes on held-out snippets (`_finetune.snippets`: text the base never saw) in small batches, reshuffled each
epoch, with AdamW at a constant LR after a short warm-up. `lora_finetune` runs it with any optimizer (a factory of
the model and the LR), bare or under an observing `keel.Guard`: the high-LR scenario, the healthy one and a
comparison of optimizers at the same LR all call it.

Needs ``peft`` (``pip install keel[test]``).

Example:
    >>> run = lora_finetune(seed=0, lr=1e-3, steps=2, guarded=False)  # doctest: +SKIP
    >>> len(run.losses)  # doctest: +SKIP
    2
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from keel._core.finding import Finding
from keel.harness.scenarios._finetune import BASE_SIZE, IGNORE, SEQ_LEN, Epochs, pretrained_base, snippets
from keel.proxy.model import create_proxy_model

EXAMPLES, BATCH = 24, 4
RANK, ALPHA = 8, 16  # peft's defaults are r 8, α 8; α = 2r is the common choice (scaling 2)
TARGETS = ("qkv", "proj", "fc")  # every linear of the proxy's blocks (attn.qkv, attn.proj, mlp.fc, mlp.proj)
WARMUP = 10

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (β 0.9/0.999, no weight decay) over the model's trainable parameters: the scenarios' default."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def lora_model(seed: int, *, rank: int = RANK, alpha: int = ALPHA, use_rslora: bool = False) -> nn.Module:
    """The pre-trained tiny proxy with peft LoRA adapters on its block linears (a ``peft.PeftModel``)."""
    import peft  # noqa: PLC0415  (an optional dependency: keel[test])

    base = create_proxy_model(BASE_SIZE, seq_len=SEQ_LEN)
    base.load_state_dict(pretrained_base(seed))
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, use_rslora=use_rslora
    )
    with torch.random.fork_rng():  # the adapters' init draws from its own seed, not the loop's stream
        torch.manual_seed(seed + 31)
        return peft.get_peft_model(base, config)


@dataclass
class LoraRun:
    """One LoRA fine-tune: per-step losses, what keel found (under a Guard), the model as trained."""

    losses: list[float] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    wall_s: float = 0.0
    model: nn.Module | None = None


def lora_finetune(
    *,
    seed: int,
    lr: float,
    steps: int,
    optimizer: OptimizerFactory = adamw,
    guarded: bool = True,
    warmup: int = WARMUP,
    rank: int = RANK,
    alpha: int = ALPHA,
    **guard_options: object,
) -> LoraRun:
    """Fine-tune the proxy's LoRA adapters for ``steps`` steps at ``lr``; under `keel.Guard` (observe) when ``guarded``.

    Args:
        seed: Seeds the base, the adapters' init, the snippets and their order.
        lr: Peak LR, reached by a linear warm-up and then held.
        steps: Optimizer steps (``EXAMPLES / BATCH`` = 6 per epoch).
        optimizer: ``optimizer(model, lr)`` builds the optimizer over the trainable (adapter) parameters.
        guarded: Train under ``keel.Guard(policy="observe")`` with the transformer probes (the LoRA probe among
            them) and the default detectors.
        warmup: Steps of the linear warm-up.
        rank: LoRA rank r.
        alpha: LoRA α (scaling α / r).
        **guard_options: Passed to the Guard (``detectors``, ``probes``, ``log_every``...).

    Returns:
        The losses, the Guard's findings (empty when bare) and the trained model.
    """
    from keel.guard import Guard  # noqa: PLC0415  (the harness sits above the Guard)

    model = lora_model(seed, rank=rank, alpha=alpha)
    opt = optimizer(model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    epochs = Epochs(*snippets(seed, EXAMPLES), batch_size=BATCH, seed=seed)
    guard = None
    if guarded:
        guard_options.setdefault("probes", "transformer")  # what the zoo's scenarios watch; it holds the LoRA probe
        guard = Guard(model, opt, scheduler, policy="observe", seed=seed, **guard_options)  # type: ignore[arg-type]
    run = LoraRun(model=model)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        for step in range(steps):
            x, y = epochs(step, None)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                opt.step()
                scheduler.step()
            opt.zero_grad(set_to_none=True)
            run.losses.append(loss.item())
    finally:
        if guard is not None:
            guard.close()
            run.findings = list(guard.findings)
    run.wall_s = time.perf_counter() - start
    return run
