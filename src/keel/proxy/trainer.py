"""The proxy trainer: one loop that uses `Guard` exactly as a user's loop would.

Warm-up then cosine decay, AdamW, next-byte cross-entropy on the stdlib corpus. With ``policy=None`` it is the
bare loop with no keel at all, the baseline keel is measured against. The sweep's runs, the demo's arms and
the scenario zoo's proxy-LM runs are all `TrainConfig`s trained here; the hooks (`TrainConfig.lr_factor`,
``batch_fn``, ``model_fn``, ``extra_probes``) are how a scenario injects its fault.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keel._core.decision import Decision
from keel._core.errors import TrainingAborted
from keel._core.finding import Finding
from keel._core.validate import check_types, require_ints, require_positive
from keel.guard import Guard
from keel.guard.guard import PROBE_SETS
from keel.losses import z_loss
from keel.nn import stabilize
from keel.nn.stabilizers import stabilizers
from keel.optim import create_optimizer, list_optimizers
from keel.proxy.corpus import ProxyBatches
from keel.proxy.model import create_proxy_model
from keel.proxy.moe import MoeConfig, moe_loss
from keel.signals import Probe

Batch = tuple[Tensor, Tensor]
# The fields that hold functions: described by name, and left out of the description while unset, so a
# config without hooks describes itself as it did before they existed (sweep stores compare descriptions).
HOOKS = ("lr_factor", "batch_fn", "model_fn", "extra_probes")
# The fixed batch behind the loss closure `extra_probes` get (the sharpness probe's curvature batch).
PROBE_BATCH_SIZE = 8
PROBE_SEED_OFFSET = 7919
# The optimizer arguments TrainConfig sets from its own fields (not allowed in `TrainConfig.optimizer_options`).
OWN_OPTIONS = ("lr", "betas", "weight_decay", "eps")
EPS = 1e-8  # torch's AdamW default


@dataclass(kw_only=True)
class TrainConfig:
    """A proxy training recipe.

    Attributes:
        size: Proxy model size (`keel.proxy.list_proxy_sizes`).
        steps: Optimizer steps.
        batch_size: Sequences per step.
        seq_len: Bytes per sequence.
        lr: Peak learning rate.
        warmup: Linear warm-up steps.
        min_lr_ratio: Cosine decay floor as a fraction of ``lr``; 1 keeps the LR constant after warm-up.
        weight_decay: AdamW (decoupled) weight decay; for ``independent_adamw`` the independent λ.
        beta2: AdamW β₂ (β₁ is 0.9).
        eps: Adam's ε (AdamW's, or the keel optimizer's, given only when it differs from the default 1e-8).
        qk_norm: LayerNorm on queries and keys.
        moe: Mixture-of-experts MLPs (`keel.proxy.MoeConfig`), their aux and router z-loss terms added to the
            training loss; None keeps the model dense.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or a `keel.optim.list_optimizers` name, built with
            the same ``lr``, ``betas`` and ``weight_decay``.
        optimizer_options: More keyword arguments of the optimizer (e.g. StableSPAM's ``reset_interval``);
            None: none.
        z_loss: z-loss coefficient added to the training loss (`keel.losses.z_loss`; 1e-4 in PaLM and
            Wortsman et al.); 0 adds nothing. The validation loss is the plain cross-entropy either way.
        stabilize: `keel.nn.stabilize` stabilizers applied to the built model and its optimizer before training,
            the z_loss stabilizer's term added to the training loss: the surgery path a user's model takes.
            ``("qk_norm", "z_loss")`` computes what ``qk_norm=True, z_loss=1e-4`` does; give one or the other.
        max_grad_norm: Global gradient-norm clipping; ``None`` does not clip.
        eval_batches: Validation batches for the final loss.
        seed: Seeds the model init and the data order.
        lr_factor: ``lr_factor(step) -> float`` multiplies the schedule at each step (an LR spike, a warm-up
            that never ends); None: 1.
        batch_fn: ``batch_fn(step, (x, y)) -> (x, y)`` replaces the batch of a step (a poisoned batch, a
            curriculum, a fine-tune's epochs); None trains on the corpus batches.
        model_fn: ``model_fn(model) -> model`` edits the built model before the optimizer sees it (a loaded
            checkpoint, a hand-written attention, frozen weights with adapters); only parameters that still
            require a gradient are trained.
        extra_probes: ``extra_probes(model, loss) -> probes`` adds probes to the Guard's, given the model and a
            closure computing the loss of a fixed batch (a curvature probe needs one).
    """

    size: str = "small"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta2: float = 0.95
    eps: float = EPS
    qk_norm: bool = False
    moe: MoeConfig | None = None
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] | None = None
    z_loss: float = 0.0
    stabilize: tuple[str, ...] = ()
    max_grad_norm: float | None = None
    eval_batches: int = 8
    seed: int = 0
    lr_factor: Callable[[int], float] | None = None
    batch_fn: Callable[[int, Batch], Batch] | None = None
    model_fn: Callable[[nn.Module], nn.Module] | None = None
    extra_probes: Callable[[nn.Module, Callable[[], Tensor]], Sequence[Probe]] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        require_ints(self, "steps", "batch_size", "seq_len", "eval_batches")
        require_ints(self, "warmup", minimum=0)
        require_positive(self, "lr")
        if not 0 < self.eps < 1:
            raise ValueError(f"TrainConfig.eps={self.eps!r}; allowed: a number with 0 < eps < 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm={self.max_grad_norm!r}; allowed: a number > 0 or None")
        if self.moe is not None and not isinstance(self.moe, MoeConfig):
            raise ValueError(f"TrainConfig.moe={self.moe!r}; allowed: None or a keel.proxy.MoeConfig")
        if self.optimizer != "adamw" and self.optimizer not in list_optimizers():
            raise ValueError(
                f"TrainConfig.optimizer={self.optimizer!r}; allowed: adamw, {', '.join(list_optimizers())}"
            )
        if self.optimizer_options is not None and not (
            isinstance(self.optimizer_options, dict)
            and all(isinstance(k, str) and k not in OWN_OPTIONS for k in self.optimizer_options)
        ):
            raise ValueError(
                f"TrainConfig.optimizer_options={self.optimizer_options!r}; allowed: None or a dict of keyword "
                f"arguments other than {', '.join(OWN_OPTIONS)} (those are fields)"
            )
        if not (0.0 <= self.z_loss < math.inf):
            raise ValueError(f"TrainConfig.z_loss={self.z_loss!r}; allowed: a finite number >= 0")
        self.stabilize = tuple(self.stabilize)
        if any(r not in stabilizers for r in self.stabilize):
            raise ValueError(
                f"TrainConfig.stabilize={self.stabilize!r}; allowed: names from {', '.join(stabilizers.names())}"
            )
        for name, field_set in (("qk_norm", self.qk_norm), ("z_loss", self.z_loss > 0)):
            if field_set and name in self.stabilize:  # it would act twice, or warn that it matched nothing
                raise ValueError(
                    f"TrainConfig.stabilize={self.stabilize!r} with "
                    f"{name}={getattr(self, name)!r}; allowed: {name!r} in one of the two"
                )
        for name in HOOKS:
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ValueError(f"TrainConfig.{name}={hook!r}; allowed: None or a function")

    def describe(self) -> dict[str, object]:
        """The config as plain data (JSON-able): every setting, and each hook that is set by its name.

        Example:
            >>> TrainConfig(size="tiny", lr_factor=abs).describe()["lr_factor"]
            'builtins.abs'
        """
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "moe":  # left out while unset, like the hooks: a dense config describes itself as before
                if value is not None:
                    out[f.name] = dataclasses.asdict(value)
            elif f.name == "optimizer_options":  # left out while unset, for the same reason
                if value is not None:
                    out[f.name] = dict(value)
            elif f.name == "eps":  # left out at its default, for the same reason
                if value != EPS:
                    out[f.name] = value
            elif f.name not in HOOKS:
                out[f.name] = value
            elif value is not None:
                name = getattr(value, "__qualname__", type(value).__qualname__)
                out[f.name] = f"{getattr(value, '__module__', None) or type(value).__module__}.{name}"
        return out


@dataclass
class ProxyRun:
    """The outcome of one proxy run (``model`` is the trained model)."""

    config: TrainConfig
    policy: str | None
    losses: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    wall_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    aborted: str | None = None
    run_dir: str | None = None
    model: nn.Module | None = None


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``, times ``lr_factor(step)``."""

    def factor(step: int) -> float:
        if step < config.warmup:
            base = (step + 1) / config.warmup
        else:
            progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
            base = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return base if config.lr_factor is None else base * config.lr_factor(step)

    return factor


def build_model(config: TrainConfig) -> nn.Module:
    """The model a run of ``config`` starts from: seeded, built by size, then edited by ``model_fn``."""
    torch.manual_seed(config.seed)
    model: nn.Module = create_proxy_model(config.size, seq_len=config.seq_len, qk_norm=config.qk_norm, moe=config.moe)
    return model if config.model_fn is None else config.model_fn(model)


def evaluate(model: nn.Module, config: TrainConfig) -> float:
    """Mean next-byte cross-entropy over ``eval_batches`` held-out batches (same batches for every run)."""
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=1234, split="val")
    model.eval()
    with torch.no_grad():
        total = sum(_loss(model, *batches.next()).item() for _ in range(config.eval_batches))
    model.train()
    return total / config.eval_batches


def train_proxy(
    config: TrainConfig,
    *,
    policy: str | None = None,
    run_dir: str | None = None,
    progress: Callable[[int, float], None] | None = None,
    **guard_options: object,
) -> ProxyRun:
    """Train one proxy model; under `Guard` with ``policy``, or bare when ``policy`` is None.

    Args:
        config: The recipe.
        policy: A `Guard` policy, or None for the bare loop without keel.
        run_dir: Where the Guard writes its run store.
        progress: Called as ``progress(step, loss)`` after every step.
        **guard_options: Passed to `Guard` (``probes``, default ``"transformer"``; ``log_every``, ...).

    Example:
        >>> run = train_proxy(TrainConfig(size="tiny", steps=3, eval_batches=1), policy="observe")
        >>> len(run.losses)
        3
    """
    model = build_model(config)
    optimizer = _create_optimizer(model, config)
    stabilized = stabilize(model, config.stabilize, optimizer=optimizer) if config.stabilize else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    batches = ProxyBatches(batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
    guard = None
    if policy is not None:
        probes: Any = guard_options.pop("probes", "transformer")  # the proxy is a transformer: watch its attention
        guard = Guard(
            model,
            optimizer,
            scheduler,
            run_dir=run_dir,
            policy=policy,  # type: ignore[arg-type]
            probes=_with_extra_probes(probes, model, config),
            max_grad_norm=config.max_grad_norm,
            config=config.describe(),
            seed=config.seed,
            **guard_options,  # type: ignore[arg-type]
        )
        guard.track(batches)
    run = ProxyRun(config=config, policy=policy, run_dir=run_dir, model=model)
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            x, y = batches.next() if config.batch_fn is None else config.batch_fn(step, batches.next())
            loss = _loss(model, x, y, config.z_loss)
            if stabilized is not None and stabilized.z_loss_hooks:
                loss = loss + stabilized.z_loss()
            if config.moe is not None and (router_losses := moe_loss(model)) is not None:
                loss = loss + router_losses
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.losses.append(loss.item())
            if progress is not None:
                progress(step, run.losses[-1])
    except TrainingAborted as exc:
        run.aborted = str(exc)
    finally:
        if guard is not None:
            guard.close()
            run.findings, run.decisions = guard.findings, guard.decisions
    run.wall_s = time.perf_counter() - start
    run.val_loss = evaluate(model, config)
    return run


def _with_extra_probes(
    probes: str | Sequence[str | Probe], model: nn.Module, config: TrainConfig
) -> str | Sequence[str | Probe]:
    """``probes`` (a set name or a list) with ``config.extra_probes`` added; a name Guard does not know is left
    for Guard to refuse."""
    if config.extra_probes is None or (isinstance(probes, str) and probes not in PROBE_SETS):
        return probes
    x, y = ProxyBatches(
        batch_size=PROBE_BATCH_SIZE, seq_len=config.seq_len, seed=config.seed + PROBE_SEED_OFFSET
    ).next()
    extra = config.extra_probes(model, lambda: _loss(model, x, y, config.z_loss))
    named = PROBE_SETS[probes] if isinstance(probes, str) else probes
    return [*named, *extra]


def _create_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # a model_fn may freeze a base model
    kwargs: dict[str, Any] = dict(lr=config.lr, betas=(0.9, config.beta2), weight_decay=config.weight_decay)
    if config.eps != EPS:
        kwargs["eps"] = config.eps
    kwargs.update(config.optimizer_options or {})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)  # type: ignore[arg-type]
    return create_optimizer(config.optimizer, params, **kwargs)


def _loss(model: nn.Module, x: Tensor, y: Tensor, z_loss_coefficient: float = 0.0) -> Tensor:
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss + z_loss(logits, coefficient=z_loss_coefficient) if z_loss_coefficient > 0 else loss
