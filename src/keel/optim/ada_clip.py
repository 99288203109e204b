"""AdaClip: per-tensor spike clipping against an adaptive threshold, a gradient transform for any optimizer.

The clipping stage of Stable-SPAM (Huang et al. 2025, arXiv 2502.17055), usable on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from keel.optim._helpers import check_range, dense_real, max_abs
from keel.optim._rows import as_rows, hot_rows, row_abs_max, scale_spikes


def ada_clip_thresholds(maxima: Tensor, ema: Tensor, steps: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """One AdaClip statistics update for N tensors at once.

    Args:
        maxima: ``(N,)`` max |g| of each tensor this step.
        ema: ``(N,)`` running M_{t−1}.
        steps: ``(N,)`` 1-based counts t used for the bias correction.
        gamma: Decay θ of the running maximum (Stable-SPAM's ``gamma3``, 0.999).

    Returns:
        ``(new_ema, threshold)``: M_t = θ·M_{t−1} + (1−θ)·max|g| and M̂_t = M_t / (1 − θ^t).
    """
    new_ema = gamma * ema + (1.0 - gamma) * maxima
    return new_ema, new_ema / (1.0 - torch.pow(gamma, steps))


def ada_clip_(grad: Tensor, maximum: Tensor, threshold: Tensor, *, out: Tensor, times: Tensor | None = None) -> Tensor:
    """Rescale the entries of one tensor with |g| > M̂ by M̂ / max|g| into ``out``; the rest pass unchanged.

    Spiked entries keep their sign and relative order and the largest lands exactly on M̂. ``out`` may
    be ``grad`` itself (in place). ``maximum`` and ``threshold`` are 0-d tensors (no host sync). ``times``
    (0-d, a power of two keeps it exact) multiplies the whole result in the same pass.
    """
    scale = (threshold / maximum.clamp_min(torch.finfo(torch.float32).tiny)).to(grad.dtype)
    spiked = torch.abs(grad).gt_(threshold)  # 1.0 where |g| > M̂, else 0.0
    if times is None:
        spiked.mul_(scale - 1.0).add_(1.0)  # per-entry multiplier: M̂/max|g| on spikes, 1 elsewhere
    else:
        times = times.to(grad.dtype)
        spiked.mul_((scale - 1.0) * times).add_(times)  # the same, times `times`
    return torch.mul(grad, spiked, out=out)


class AdaClip:
    """Spike-aware gradient clipping with a per-tensor adaptive threshold, for any optimizer.

    Use it where ``clip_grad_norm_`` would sit, between ``backward()`` and ``optimizer.step()``, when
    occasional gradient spikes hit a few entries: a global norm clip then shrinks every entry of every
    tensor, while AdaClip only rescales the entries above a running bias-corrected mean of each
    tensor's max |g| (threshold M̂). Gradients are changed in place.

    Per tensor and call t: M_t = θ·M_{t−1} + (1−θ)·max|g|, M̂ = M_t/(1−θ^t); entries with |g| > M̂ become
    g·M̂/max|g|. The statistics are 0-d tensors on the gradients' device. On accelerators every tensor
    takes the dense clip, with no host sync; on CPU (where host reads are free) only tensors with
    max|g| > M̂ are clipped, and only in the rows that hold the spike.

    Its statistics are its own, not the optimizer's: a checkpoint saves them with ``clipper.state_dict()``, and under
    a `keel.Guard` ``guard.track(clipper, name="ada_clip")`` puts them in keel's snapshots, so a resumed run
    continues bit for bit (a rollback leaves tracked objects as they are: the threshold keeps what it learned).

    Args:
        params: The parameters whose gradients are clipped.
        gamma: θ, the decay of the running max (Stable-SPAM's ``gamma3``, default 0.999).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> clipper = AdaClip(model.parameters())
        >>> handle = clipper.attach(opt)   # or call clipper.clip_() before opt.step()
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()

    References:
        Huang et al. (2025), "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
        arXiv 2502.17055. Official code: TianjinYellow/StableSPAM ``galore_torch/stablespam.py``.
    """

    def __init__(self, params: Iterable[Tensor], *, gamma: float = 0.999) -> None:
        check_range("AdaClip", "gamma", gamma, 0.0, 1.0, high_open=True)
        self.params = list(params)
        if not self.params:
            raise ValueError("AdaClip got an empty parameter list; allowed: at least one parameter")
        self.gamma = gamma
        # Per parameter: [t (python int), M_{t-1} (0-d float32 tensor on the parameter's device)].
        self._steps: list[int] = [0] * len(self.params)
        self._ema: list[Tensor | None] = [None] * len(self.params)

    @torch._disable_dynamo
    @torch.no_grad()
    def clip_(self) -> Tensor:
        """Clip every gradient in place; returns the largest max|g| / M̂ (> 1: something was clipped).

        Runs eagerly inside a ``torch.compile``'d function (one graph break): the step counts are host ints, which
        dynamo recompiled for at every step (20 graphs in 8 steps, called alone or from a compiled
        ``optimizer.step()`` through `attach`'s hook).

        Tensors without a gradient are skipped and their statistics do not advance. A gradient with an inf or NaN
        (an fp16 overflow step the GradScaler will skip) leaves its tensor's running max as it was (off the CPU its
        step count still advances: reading it back would cost a host sync), so clipping goes on after it.
        """
        # (a sparse gradient or a complex parameter: one error, in the same pass)
        with_grad = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None and dense_real("AdaClip", p)]
        if not with_grad:
            return torch.zeros(())
        active, grads = [i for i, _ in with_grad], [g for _, g in with_grad]
        for i in active:
            self._steps[i] += 1
        ratios = []
        for device_indices in _by_device(grads).values():
            idx = [active[j] for j in device_indices]
            dev_grads = [grads[j] for j in device_indices]
            on_cpu = dev_grads[0].device.type == "cpu"
            maxima = torch.stack(max_abs(dev_grads)).float()
            ema = torch.stack([self._ema_of(i) for i in idx])
            steps = torch.tensor([float(self._steps[i]) for i in idx], device=maxima.device)
            new_ema, thresholds = ada_clip_thresholds(maxima, ema, steps, self.gamma)
            # a non-finite gradient (an fp16 overflow the GradScaler then skips) leaves the statistics as they were:
            # its inf or NaN in the running max switched clipping off for the rest of the run
            finite = torch.isfinite(maxima)
            new_ema = torch.where(finite, new_ema, ema)
            for k, i in enumerate(idx):
                self._ema[i] = new_ema[k]
            if on_cpu:  # host values are free: the step count stays too, and only the rows that hold a spike clip
                for k in (~finite).nonzero().flatten().tolist():
                    self._steps[idx[k]] -= 1
                for g, peak, thr in zip(dev_grads, maxima.tolist(), thresholds.tolist(), strict=True):
                    if peak > thr:
                        _clip_rows_(g, thr, peak)
            else:
                for g, m, thr in zip(dev_grads, maxima, thresholds, strict=True):
                    ada_clip_(g, m, thr, out=g)
            ratio = (maxima / thresholds.clamp_min(torch.finfo(torch.float32).tiny)).max()
            ratios.append(ratio.to(grads[0].device, non_blocking=True))  # no host sync
        return torch.stack(ratios).max()

    def _ema_of(self, i: int) -> Tensor:
        """M_{t-1} of parameter ``i``; 0 (on its device) before its first gradient."""
        ema = self._ema[i]
        if ema is None:
            ema = self._ema[i] = torch.zeros((), dtype=torch.float32, device=self.params[i].device)
        return ema

    def attach(self, optimizer: Optimizer) -> RemovableHandle:
        """Run `clip_` before every ``optimizer.step()`` (a step pre-hook); returns the hook's handle."""

        def hook(opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.clip_()

        return optimizer.register_step_pre_hook(hook)

    def state_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "steps": list(self._steps),
            "ema": [None if e is None else e.detach().clone() for e in self._ema],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["steps"]) != len(self.params):
            raise ValueError(
                f"state has {len(state['steps'])} parameters; allowed: {len(self.params)} (this AdaClip's)"
            )
        self.gamma = float(state["gamma"])
        self._steps = [int(s) for s in state["steps"]]
        self._ema = [
            None if e is None else e.detach().to(device=p.device, dtype=torch.float32).clone()
            for e, p in zip(state["ema"], self.params, strict=True)
        ]


def _clip_rows_(grad: Tensor, threshold: float, maximum: float) -> None:
    """AdaClip in place on the rows of ``grad`` that hold a spike (all of it when that is cheaper)."""
    many_rows = grad.dim() >= 2 and grad.shape[0] >= 8 and grad.is_contiguous()
    hot = hot_rows(row_abs_max(as_rows(grad)), threshold) if many_rows else None
    if hot is None:
        full = torch.tensor(threshold, dtype=torch.float32)
        ada_clip_(grad, torch.tensor(maximum, dtype=torch.float32), full, out=grad)
        return
    rows = as_rows(grad)
    rows.index_copy_(0, hot, scale_spikes(rows.index_select(0, hot), threshold, maximum))


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    buckets: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault(t.device, []).append(i)
    return buckets
