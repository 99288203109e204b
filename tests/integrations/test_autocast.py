"""keel under CPU autocast: float32 parameters, bf16/fp16 activations and logits, the loss as autocast computes it.

keel's tiny proxy LM trains a few steps under ``torch.autocast("cpu")`` with a `Guard` and each probe set:
every value is finite and agrees with a float32 run's; ``observe`` is bit-identical to the bare autocast loop;
a NaN born in a block is skipped under ``skip`` and rolled back to the exact snapshot under ``recover``; under
fp16 with a ``torch.amp.GradScaler("cpu")`` the scaler's overflow steps are its own skips, not keel's. The
parameter-dtype matrices (`tests/signals/test_probe_dtype_matrix.py`, `tests/optim/test_dtype_matrix.py`) cover
bf16/fp16 *parameters*; the optimizers under autocast are in `tests/optim/test_optim_autocast.py`; the CUDA twins in
`tests/gpu/test_cuda_autocast.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel._core import keys
from keel.proxy import create_proxy_model
from keel.recover import RecoveryConfig
from keel.signals import OutputLogitsProbe, softmax_collapse_fraction
from tests.integrations.autocast_run import POISONED_BLOCK, Result, Setup, optimizer_tensors, params, train

SETS = ["default", "transformer", "full"]
# what each set adds, by key prefix: present at every step (the probes measure at every step here)
FAMILIES = {
    "default": ("loss", "grad/norm", "param/norm"),
    "transformer": ("attn/max_logit", "attn/entropy", "logits/log_z", "logits/softmax_collapse", "act/rms"),
    "full": ("update/ratio", "grad/weight_cos", "adam/update_rms"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keel_errors(run) -> list:
    return [f for f in run.guard.findings if f.kind == "keel_error"]


def _assert_same_training(a, b) -> None:
    torch.testing.assert_close(
        torch.tensor(a.losses, dtype=torch.float64),
        torch.tensor(b.losses, dtype=torch.float64),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    assert all(torch.equal(a.starts[-1][k], b.starts[-1][k]) for k in a.starts[-1])
    pa, pb = params(a.model), params(b.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa), [k for k in pa if not torch.equal(pa[k], pb[k])]
    oa, ob = optimizer_tensors(a.optimizer), optimizer_tensors(b.optimizer)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def check_signals_agree_with_float32(probes: str, dtype: torch.dtype, device: str) -> None:
    """Four steps of each run: no keel error, the same keys, every value finite, each set's signals at every step,
    and each value near the float32 run's (closer at step 0, where the weights are still the same)."""
    ref = train(Setup(device=device, dtype=None, probes=probes, steps=4))
    got = train(Setup(device=device, dtype=dtype, probes=probes, steps=4))
    assert _keel_errors(got) == [] and _keel_errors(ref) == []
    assert got.values.keys() == ref.values.keys()
    wanted = [f for name in SETS[: SETS.index(probes) + 1] for f in FAMILIES[name]]
    for step in range(4):
        assert got.non_finite(step) == {}
        # (Adam's moments, which adam/ reads, exist from the first update on)
        missing = [f for f in wanted if f"{f}@{step}" not in got.values and not (f.startswith("adam/") and step == 0)]
        assert missing == []
    if probes == "default":
        assert not any(k.startswith(("attn/", "logits/", "act/")) for k in got.values)
    values = {k: v for k, v in got.values.items() if not k.startswith("time/")}
    # the format the activations are held in is autocast's, not float32's: said, not compared
    held = {v for k, v in values.items() if k.startswith(keys.ACT_FORMAT_MAX)}
    assert held <= {torch.finfo(dtype).max} and (held or probes == "default")
    values = {k: v for k, v in values.items() if not k.startswith(keys.ACT_FORMAT_MAX)}
    # step 0: the same weights, only the activations rounded; later steps drift apart a little. A cosine
    # lives in [-1, 1] and the bias ones hover near 0 (the biases start at 0): those are compared absolutely
    off = {
        k: (v, ref.values[k])
        for k, v in values.items()
        if not math.isclose(
            v,
            ref.values[k],
            rel_tol=0.02 if k.endswith("@0") else 0.1,
            abs_tol=1e-3 if k.endswith("@0") else 0.05 if k.startswith("grad/weight_cos") else 1e-2,
        )
    }
    assert off == {}
    assert got.losses[0] == pytest.approx(ref.losses[0], rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("probes", SETS)
def test_every_signal_under_autocast_is_finite_and_agrees_with_float32(probes: str, dtype: torch.dtype) -> None:
    check_signals_agree_with_float32(probes, dtype, "cpu")


def check_observe_is_bit_identical(
    probes: str | None, dtype: torch.dtype, device: str, init_scale: float | None = None
) -> None:
    """Eight steps bare and under an observing guard (``probes=None``: bare twice): the same losses, parameters,
    optimizer state and loss scales, bit for bit."""
    bare = train(Setup(device=device, dtype=dtype, probes=None, steps=8, init_scale=init_scale))
    observed = train(Setup(device=device, dtype=dtype, probes=probes, policy="observe", steps=8, init_scale=init_scale))
    assert all(d.action == "ok" or d.by == "scaler" for d in observed.decisions)  # the scaler's own skips
    _assert_same_training(bare, observed)
    assert bare.scales == observed.scales


def check_nan_is_skipped_and_traced(dtype: torch.dtype, device: str) -> None:
    """A NaN born in ``blocks.1`` at step 3: skipped (the bare loop that leaves step 3 out is matched bit for bit)
    and traced to that block; the run goes on healthy."""
    guarded = train(Setup(device=device, dtype=dtype, probes="transformer", policy="skip", poison=(3,)))
    bare = train(Setup(device=device, dtype=dtype, probes=None, poison=(3,), skip=(3,)))
    assert [(d.step, d.action) for d in guarded.decisions if d.action != "ok"] == [(3, "skip")]
    kinds = {f.kind: f for f in guarded.decisions[3].findings}
    assert kinds["non_finite"].severity == "critical"
    assert kinds["non_finite_origin"].evidence["module"] == POISONED_BLOCK
    assert all(torch.equal(guarded.starts[3][k], guarded.starts[4][k]) for k in guarded.starts[3])  # not applied
    assert guarded.guard.escalation.consecutive_skips == 0
    _assert_same_training(bare, guarded)
    assert guarded.non_finite(4) == {} and guarded.non_finite(5) == {}


def check_rollback_restores_the_snapshot_exactly(dtype: torch.dtype, device: str) -> Result:
    """NaN at steps 6–8 with two skips allowed: skip, skip, then a rollback whose parameters are bit for bit those
    the restored step started from and those the snapshot holds. Returns the run."""
    run = train(
        Setup(
            device=device,
            dtype=dtype,
            probes="transformer",
            policy="recover",
            steps=12,
            poison=(6, 7, 8),
            max_consecutive_skips=2,
            recovery=RecoveryConfig(snapshot_every=2, quiet_steps=0),
        )
    )
    assert [(d.step, d.action) for d in run.decisions if d.action != "ok"] == [
        (6, "skip"),
        (7, "skip"),
        (8, "rollback"),
    ]
    restored = run.decisions[8].restored_step
    assert restored is not None and restored <= 6
    after = run.starts[9]  # the parameters step 9 started from: the rollback's
    assert all(torch.equal(after[k], run.starts[restored][k]) for k in after)  # as they were at that step's start
    [snapshot] = [s for s in run.guard.recovery.ring.snapshots if s.step == restored]
    assert all(torch.equal(after[k], snapshot.tensors[f"model/{k}"]) for k in after)  # and as the snapshot holds
    assert all(run.non_finite(step) == {} for step in (9, 10, 11))
    assert all(math.isfinite(loss) for loss in run.losses[9:])
    return run


def check_scaler_overflows_are_its_own_skips(device: str) -> list[int]:
    """fp16 autocast with a GradScaler whose 2^24 overflows the backward until it has halved it enough: each overflow
    step (the scale fell) is a ``skip`` by the scaler with an ``info`` finding, not counted as keel's; the others
    apply and measure finite values. Returns the overflow steps."""
    run = train(Setup(device=device, dtype=torch.float16, probes="full", policy="skip", steps=10, init_scale=2.0**24))
    overflowed = [step for step in range(9) if run.scales[step + 1] < run.scales[step]]
    assert overflowed, "the scale of 2^24 never overflowed"
    assert [(d.step, d.action, d.by) for d in run.decisions if d.action != "ok"] == [
        (step, "skip", "scaler") for step in overflowed
    ]
    for step in overflowed:
        findings = run.decisions[step].findings
        assert [(f.kind, f.severity) for f in findings if f.kind == "loss_scale_overflow"] == [
            ("loss_scale_overflow", "info")
        ]
        assert run.values[f"amp/scale@{step}"] == run.scales[step]
        assert all(torch.equal(run.starts[step][k], run.starts[step + 1][k]) for k in run.starts[step])
    assert run.guard.escalation.consecutive_skips == 0
    assert _keel_errors(run) == []
    applied = [step for step in range(10) if run.decisions[step].action == "ok"]
    assert applied and all(run.non_finite(step) == {} for step in applied)
    assert run.scaler.get_scale() == 2.0**24 / 2 ** len(overflowed)  # halved once per overflow by the scaler alone
    return overflowed


def check_collapse_is_judged_in_the_working_precision(device: str, precision: str | None) -> None:
    """Autocast runs cross-entropy (log-softmax, NLL) in float32 on every device whatever the logits' dtype, so that
    is the softmax whose collapse matters by default: a row confident in bf16 (Σ exp(z − max z) rounds to 1) keeps
    a gradient in float32 and must not count as collapsed (the detector warns at 1 % of rows, is critical at 50 %).
    An explicit ``precision`` is honoured as given."""
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(device)
    with torch.no_grad():  # a confident row everywhere: logit 0 ≈ 16 above the rest (LayerNorm's output sums to 0)
        model.ln_f.bias.fill_(1.0)
        model.head.weight[0].fill_(0.25)
    probe = OutputLogitsProbe(module="head", precision=precision)
    probe.attach(model)
    idx = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.zeros(4, 16, dtype=torch.long, device=device)  # the confident class: zero loss if collapsed
    probe.set_targets(targets)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(idx)
        rows = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    rows.mean().backward()
    got = probe.read()
    probe.detach()
    assert logits.dtype == torch.bfloat16 and rows.dtype == torch.float32
    assert float(softmax_collapse_fraction(logits)) == 1.0  # in bf16 every row is collapsed ...
    assert bool((rows > 0).all())  # ... but the loss's float32 softmax has a gradient in every row
    expected = 1.0 if precision == "bfloat16" else 0.0
    assert float(got["logits/softmax_collapse"]) == expected
    assert float(got["logits/zero_loss"]) == expected


@pytest.mark.parametrize("probes", SETS)
def test_observe_under_bf16_autocast_is_bit_identical_to_the_bare_loop(probes: str) -> None:
    check_observe_is_bit_identical(probes, torch.bfloat16, "cpu")


@pytest.mark.parametrize("probes", ["default", "full"])
def test_fp16_autocast_with_a_grad_scaler_observe_is_bit_identical_to_the_bare_loop(probes: str) -> None:
    check_observe_is_bit_identical(probes, torch.float16, "cpu", init_scale=2.0**24)  # five overflow steps


def test_a_nan_born_under_bf16_autocast_is_skipped_and_traced_to_its_block() -> None:
    check_nan_is_skipped_and_traced(torch.bfloat16, "cpu")


def test_a_rollback_under_bf16_autocast_restores_the_snapshot_exactly() -> None:
    check_rollback_restores_the_snapshot_exactly(torch.bfloat16, "cpu")


@pytest.mark.parametrize("precision", [None, "bfloat16", "float32"])
def test_output_logits_under_autocast_judge_collapse_in_the_float32_softmax_of_the_loss(precision: str | None) -> None:
    check_collapse_is_judged_in_the_working_precision("cpu", precision)


def test_fp16_autocast_with_a_grad_scaler_overflows_are_the_scalers_skips_not_keels() -> None:
    # 2^24 overflows fp16's backward on this model until the scaler has halved it to 2^19: five overflow steps
    assert check_scaler_overflows_are_its_own_skips("cpu") == [0, 1, 2, 3, 4]
