"""How to drive each registered detector with the signals it reads: a healthy series and one that triggers it.

The contract tests (`test_detector_contract.py`) are parametrised over `keel.detect.list_detectors()` and look
each name up here, so a new detector without an entry fails them. Every series is seeded and short (a few
hundred observations at most), and touches every key the detector reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from keel._core.observation import Observation
from keel.detect.scan import ReadsKeys

# the detectors' own test series, imported with this module: a test module first imported inside a running
# hypothesis test applies its @given there, which hypothesis refuses (nested_given) when that file was not collected
from tests.detect import (
    rl_series,
    test_eps_dominance,
    test_lora_blowup,
    test_loss_scale_thrash,
    test_lr_surge,
    test_moe_detectors,
    test_opposing_signals,
    test_qat_oscillation,
    test_source_drift,
    test_stability_gap,
)

BLOCKS = ("blocks.0", "blocks.1", "blocks.2")
PARAMS = ("blocks.0.weight", "blocks.1.weight", "head.weight")


@dataclass(frozen=True)
class Drive:
    """A detector's test inputs.

    Attributes:
        healthy: Observations of a healthy run: no finding at all.
        trigger: Observations of the trouble the detector exists for: at least one finding.
    """

    healthy: Callable[[], list[Observation]]
    trigger: Callable[[], list[Observation]]


def reads_of(det: object) -> tuple[str, ...]:
    """The keys a detector reads: its declared ``reads``, else the one signal of its config."""
    return det.reads if isinstance(det, ReadsKeys) else (det.config.signal,)


def _noise(n: int, seed: int, scale: float) -> np.ndarray:
    return np.exp(scale * np.random.default_rng(seed).standard_normal(n))


def _scalar(key: str, values, *, start: int = 0, every: int = 1, extra=None) -> list[Observation]:
    return [Observation(step=start + every * i, values={key: float(v), **(extra or {})}) for i, v in enumerate(values)]


def _healthy_loss() -> np.ndarray:
    t = np.arange(300)
    return (2.0 + 3.0 * np.exp(-t / 60)) * _noise(len(t), 1, 0.01)


def _spiking_loss() -> np.ndarray:
    loss = _healthy_loss()
    loss[200] *= 5.0
    return loss


def _diverging_loss() -> np.ndarray:
    loss = _healthy_loss()[:150]
    return np.concatenate([loss, loss[-1] * np.linspace(1.0, 4.0, 60)])


def _norms(
    step: int, loss: float, grad: float, param: float, *, bad_block: int | None = None, bad_param: int | None = None
) -> Observation:
    act = [1.0 + i for i in range(len(BLOCKS))]
    grads = [0.1 * (i + 1) for i in range(len(PARAMS))]
    if bad_block is not None:
        act[bad_block:] = [math.inf] + [math.nan] * (len(BLOCKS) - bad_block - 1)
    if bad_param is not None:
        grads[: bad_param + 1] = [math.nan] * (bad_param + 1)
    return Observation(
        step=step,
        values={"loss": loss, "grad/norm": grad, "param/norm": param},
        per_param={"act/max_abs/": (BLOCKS, act), "grad/norm/": (PARAMS, grads)},
    )


def _healthy_norms() -> list[Observation]:
    loss = _healthy_loss()[:100]
    return [_norms(s, float(v), 1.0 + 0.01 * (s % 5), 30.0) for s, v in enumerate(loss)]


def _non_finite_norms() -> list[Observation]:
    run = _healthy_norms()[:60]
    run += [
        _norms(60, math.nan, math.nan, 30.0, bad_block=1),
        _norms(61, 2.1, math.inf, 30.0, bad_param=1),
        _norms(62, 2.1, 1.0, 30.0),
        _norms(63, 2.1, 1.0, math.nan),
    ]
    return run


def _healthy_logits() -> np.ndarray:
    # keel's proxy at a healthy learning rate: ×1.27 per step from near zero to ~50, then a noisy plateau
    rise = 0.2 * 1.27 ** np.arange(24)
    return np.concatenate([rise, 50.0 * _noise(120, 2, 0.02)])


def _growing_logits() -> np.ndarray:
    return np.concatenate([np.ones(10), 2.0 ** np.arange(1, 12)])


def _healthy_activations() -> np.ndarray:
    # keel's tiny proxy at LR 1e-2: the largest block output rises from 0.2 to ~100 in 100 steps, then creeps to ~170
    rise = np.minimum(0.2 * 1.1 ** np.arange(100), 100.0)
    return np.concatenate([rise, np.linspace(100.0, 170.0, 200) * _noise(200, 4, 0.05)])


def _growing_activations() -> np.ndarray:
    # the same at LR 0.1 (scenario fp16_overflow): ~2000, then ×1.05 per step past fp16's 65504
    return 2000.0 * 1.05 ** np.arange(80) * _noise(80, 5, 0.1)


def _activations(top: np.ndarray) -> list[Observation]:
    # the activation probe's max, and the numerics probe's headroom of the same values in fp16
    return [
        Observation(step=i, values={"act/max_abs": float(v), "numerics/headroom": math.log2(65504.0 / v)})
        for i, v in enumerate(top)
    ]


def _healthy_entropy() -> np.ndarray:
    t = np.arange(60)
    return (1.7 + 1.5 * np.exp(-t / 15)) * _noise(len(t), 3, 0.01)  # keeps more than half of its start


def _collapsing_entropy() -> np.ndarray:
    return np.array([3.2, 3.2, 3.1, 2.6, 1.9, 1.3, 0.7, 0.6, 0.4, 0.25, 0.12, 0.1])


def _healthy_log_z() -> np.ndarray:
    t = np.arange(200)
    return 10.8 - 2.5 * (1 - np.exp(-t / 40)) + 0.05 * np.random.default_rng(4).standard_normal(len(t))


def _drifting_log_z() -> np.ndarray:
    return np.concatenate([np.full(20, 5.5), 5.5 + 0.2 * np.arange(1, 130)])


def _margins(values, lrs) -> list[Observation]:
    return [
        Observation(step=5 * i, values={"curvature/margin": float(m), "lr": float(lr), "curvature/sharpness": 50.0})
        for i, (m, lr) in enumerate(zip(values, lrs, strict=True))
    ]


def _healthy_margins() -> list[Observation]:
    # warm-up (Adam's large early margins falling) and then the benign edge of stability
    margins = [40.0, 25.0, 9.0, 3.0, 0.4, 0.8, 0.95, 1.05, 1.2, 0.98, 1.4, 1.1, 1.9, 1.3, 1.0, 0.9]
    return _margins(margins, np.geomspace(1e-4, 1e-2, len(margins)))


def _lr_jump_margins() -> list[Observation]:
    return _margins([0.8, 0.9, 1.1, 2.5, 1.2, 11.0, 14.0], [0.01, 0.01, 0.01, 0.03, 0.01, 0.1, 0.1])


def _opposition(spike_at: int | None = None) -> list[Observation]:
    """Loss every step, opposition every 5 steps, sharpness every 20; with ``spike_at`` both spike there."""
    return test_opposing_signals.series(seed=3, spike_at=spike_at)


def _sources(bad: int | None = None) -> list[Observation]:
    """Three sources' loss, gradient norm and cosine every 10 steps (the loss also as the loop's step losses); with
    ``bad``, that source drifts from the 60th."""
    return test_source_drift.series(seed=1, bad=bad, bad_from=60, jump=12.0, step_losses=True)


def _evals(gap: float = 0.0) -> list[Observation]:
    """Evals every 10 steps with the phase index, a switch at step 200; with ``gap``, task a's eval collapses there."""
    return test_stability_gap.series(seed=0, gap=gap)


def _lora_ratio(race_from: int | None = None) -> list[Observation]:
    return test_lora_blowup.series(race_from=race_from)


def _qat_share(oscillate_from: int | None = None) -> list[Observation]:
    return test_qat_oscillation.series(oscillate_from=oscillate_from)


def _adam_eps(collapse: bool = False) -> list[Observation]:
    """The Adam ε probe's values every 50 steps (share, update RMS, per parameter); with ``collapse``, ε takes over."""
    points = [(0.0, 0.25)] * 6 + ([(0.95, 0.03)] * 4 if collapse else [(0.001, 0.22)] * 4)
    return test_eps_dominance.trace(points, per_param=(PARAMS, [0.0, 0.0, 0.01]))


def _loss_scale(thrash: bool = False) -> list[Observation]:
    """A GradScaler's scale and overflow flags: the initial search, then its sawtooth; with ``thrash``, backoffs in
    a row from step 150."""
    overs = [s < 4 or (s % 50 == 49) or (thrash and s >= 150) for s in range(200)]
    return test_loss_scale_thrash.scaler_trace(overs, growth_interval=40)


def _lr_schedule(surge_at: int | None = None) -> list[Observation]:
    """litgpt's warm-up + cosine learning rates over 120 steps; with ``surge_at``, that one update at 100x."""
    lrs = test_lr_surge.litgpt_lrs(steps=120)
    if surge_at is not None:
        lrs[surge_at] *= 100
    return test_lr_surge.observations(lrs)


def _running_var_jumps(corrupt_at: int | None = None) -> list[Observation]:
    """A BatchNorm CNN's step-to-step running-variance ratios (0.93..1.07 on a CIFAR-style loop), no value at the
    first step (the probe's reference); with ``corrupt_at``, one batch of pixels x1e4 there."""
    values = _noise(150, 21, 0.02)
    if corrupt_at is not None:
        values[corrupt_at] = 9.6e6
    return _scalar("norm/running_var_jump", values[1:], start=1)


def _moe(name: str) -> list[Observation]:
    return test_moe_detectors.recorded(name, 150)


DRIVES: dict[str, Drive] = {
    "spike": Drive(healthy=lambda: _scalar("loss", _healthy_loss()), trigger=lambda: _scalar("loss", _spiking_loss())),
    "divergence": Drive(
        healthy=lambda: _scalar("loss", _healthy_loss()), trigger=lambda: _scalar("loss", _diverging_loss())
    ),
    "non_finite": Drive(healthy=_healthy_norms, trigger=_non_finite_norms),
    "non_finite_origin": Drive(healthy=_healthy_norms, trigger=_non_finite_norms),
    "attention_logit_growth": Drive(
        healthy=lambda: _scalar("attn/max_logit", _healthy_logits(), every=2),
        trigger=lambda: _scalar("attn/max_logit", _growing_logits()),
    ),
    "attention_entropy_collapse": Drive(
        healthy=lambda: _scalar("attn/entropy", _healthy_entropy(), every=10),
        trigger=lambda: _scalar("attn/entropy", _collapsing_entropy(), every=10),
    ),
    "output_logit_drift": Drive(
        healthy=lambda: _scalar("logits/log_z", _healthy_log_z()),
        trigger=lambda: _scalar("logits/log_z", _drifting_log_z()),
    ),
    "softmax_collapse": Drive(
        healthy=lambda: _scalar("logits/softmax_collapse", np.zeros(50)),
        trigger=lambda: _scalar(
            "logits/softmax_collapse", [0.0] * 5 + [0.004, 0.02, 0.08, 0.3, 0.7, 0.9, 0.0, 0.6, 0.6]
        ),
    ),
    "edge_of_stability": Drive(healthy=_healthy_margins, trigger=_lr_jump_margins),
    "activation_growth": Drive(
        healthy=lambda: _activations(_healthy_activations()), trigger=lambda: _activations(_growing_activations())
    ),
    "eps_dominance": Drive(healthy=_adam_eps, trigger=lambda: _adam_eps(collapse=True)),
    "loss_scale_thrash": Drive(healthy=_loss_scale, trigger=lambda: _loss_scale(thrash=True)),
    "lr_surge": Drive(healthy=_lr_schedule, trigger=lambda: _lr_schedule(surge_at=60)),
    "norm_stats_jump": Drive(healthy=_running_var_jumps, trigger=lambda: _running_var_jumps(corrupt_at=100)),
    "source_drift": Drive(healthy=_sources, trigger=lambda: _sources(bad=2)),
    "opposing_signals": Drive(healthy=_opposition, trigger=lambda: _opposition(spike_at=200)),
    # preference and policy-gradient RL (tests/detect/rl_series.py): 120 steps each, every key the detector reads
    "likelihood_displacement": Drive(
        healthy=lambda: rl_series.dpo(0, n=120), trigger=lambda: rl_series.dpo(0, fall_from=40, fall_rate=0.01, n=120)
    ),
    "policy_entropy_collapse": Drive(
        healthy=lambda: rl_series.entropy(0, n=120), trigger=lambda: rl_series.entropy(0, collapse_from=30, n=120)
    ),
    "kl_blowup": Drive(healthy=lambda: rl_series.kl(0, n=120), trigger=lambda: rl_series.kl(0, blow_from=60, n=120)),
    "reward_overoptimization": Drive(
        healthy=lambda: rl_series.rewards(0, n=120),
        trigger=lambda: rl_series.rewards(0, spread_from=40, gold_peak=70, n=120),
    ),
    "length_explosion": Drive(
        healthy=lambda: rl_series.lengths(0, n=120),
        trigger=lambda: rl_series.lengths(0, explode_from=30, limit=400, n=120),
    ),
    "clip_saturation": Drive(
        healthy=lambda: rl_series.clips(0, n=120), trigger=lambda: rl_series.clips(0, climb_from=30, n=120)
    ),
    "dead_groups": Drive(
        healthy=lambda: rl_series.groups(0, n=120), trigger=lambda: rl_series.groups(0, dead_from=60, n=120)
    ),
    # continual evaluation: a switch where the evals only fluctuate, and one with a stability gap
    "stability_gap": Drive(healthy=_evals, trigger=lambda: _evals(gap=0.4)),
    # LoRA: an adapter's ‖ΔW‖/‖W‖ growing from B = 0 as it should, and one racing from step 100
    "lora_blowup": Drive(healthy=lambda: _lora_ratio(), trigger=lambda: _lora_ratio(race_from=100)),
    # MoE routers: keel's proxy MoE with the balancing loss at LR 1e-3 (healthy) and 3e-2 (router growth, collapse)
    "router_logit_growth": Drive(healthy=lambda: _moe("healthy_aux"), trigger=lambda: _moe("high_lr")),
    "load_collapse": Drive(healthy=lambda: _moe("healthy_aux"), trigger=lambda: _moe("high_lr")),
    "dead_experts": Drive(healthy=lambda: _moe("healthy_aux"), trigger=lambda: _moe("high_lr")),
    # QAT: the weight-oscillation share warming up to ~0.15, and a layer oscillating from step 100
    "qat_oscillation": Drive(healthy=lambda: _qat_share(), trigger=lambda: _qat_share(oscillate_from=100)),
}
