"""Numerics probe: float64 references, hostile values, formats; the probe on fp32, bf16, fp16-autocast, fp8 models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from keel._core import keys
from keel.guard import Guard
from keel.proxy import create_proxy_model
from keel.signals.numerics import FORMATS, NumericsConfig, NumericsProbe, judged_format, numerics_stats
from tests.signals.contexts import step_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(x: np.ndarray, dtype: torch.dtype, fp8: torch.dtype | None = None) -> list[float]:
    """[headroom, near-max, underflow] in float64, straight from the definitions."""
    info = torch.finfo(dtype)
    a = np.abs(x.astype(np.float64)).ravel()
    smallest = info.tiny * info.eps
    if a.size == 0:
        return [math.log2(info.max / smallest), 0.0, 0.0]
    amax = a.max()
    headroom = math.log2(info.max) - math.log2(max(amax, smallest)) if not math.isnan(amax) else math.nan
    tiny = info.tiny if fp8 is None else amax * torch.finfo(fp8).tiny / torch.finfo(fp8).max
    nonzero = np.count_nonzero(a)
    under = np.count_nonzero((a > 0) & (a < tiny))
    return [headroom, float(np.mean(a >= info.max / 2)), under / max(nonzero, 1)]


def close(got: torch.Tensor, want: list[float]) -> bool:
    g = got.tolist()
    return (
        (math.isnan(want[0]) and math.isnan(g[0]) or g[0] == pytest.approx(want[0], rel=1e-6, abs=1e-5))
        and g[1] == pytest.approx(want[1], abs=1e-7)
        and g[2] == pytest.approx(want[2], abs=1e-7)
    )


finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(x=arrays(np.float32, st.integers(0, 40), elements=finite_or_not), fmt=st.sampled_from(sorted(FORMATS)))
def test_stats_match_a_float64_reference_on_any_float32_tensor(x, fmt):
    dtype = FORMATS[fmt]
    assert close(numerics_stats(torch.from_numpy(x), dtype), reference(x, dtype))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    x=arrays(np.float32, st.integers(1, 40), elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)),
    fp8=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]),
)
def test_fp8_underflow_under_dynamic_scaling_matches_the_reference(x, fp8):
    got = numerics_stats(torch.from_numpy(x), torch.float32, fp8=fp8)
    assert close(got, reference(x, torch.float32, fp8))


def test_fp8_underflow_is_judged_after_scaling_to_the_format_range():
    # amax 448 -> scale 1 for e4m3 (max 448, smallest normal 2^-6): 2^-7 underflows, 2^-6 does not
    x = torch.tensor([448.0, 2.0**-6, 2.0**-7, 0.0])
    assert numerics_stats(x, torch.float32, fp8=torch.float8_e4m3fn).tolist()[2] == pytest.approx(1 / 3)
    # the same shape of tensor 1000x smaller scales up by 1000: the same elements underflow, not all of them
    assert numerics_stats(x / 1000, torch.float32, fp8=torch.float8_e4m3fn).tolist()[2] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("values", "dtype", "want"),
    [
        ([65504.0, 1.0], torch.float16, [0.0, 0.5, 0.0]),  # at the format's max: no headroom, one near it
        ([math.inf, 1.0], torch.float16, [-math.inf, 0.5, 0.0]),  # already overflowed
        ([-math.inf, -1.0], torch.bfloat16, [-math.inf, 0.5, 0.0]),
        ([0.0, 0.0], torch.float16, [math.log2(65504 / 2.0**-24), 0.0, 0.0]),  # all zero: the whole range, no underflow
        ([], torch.float16, [math.log2(65504 / 2.0**-24), 0.0, 0.0]),
        (
            [2.0**-14, 2.0**-15, 2.0**-24, 0.0],
            torch.float16,
            [math.log2(65504) + 14, 0.0, 2 / 3],
        ),  # subnormals underflow
        ([1e-39, 1.0], torch.float32, [math.log2(torch.finfo(torch.float32).max), 0.0, 0.5]),  # an fp32 subnormal
    ],
)
def test_hostile_values(values, dtype, want):
    got = numerics_stats(torch.tensor(values, dtype=torch.float32), dtype).tolist()
    assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1:] == pytest.approx(want[1:])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    x=arrays(np.float32, st.integers(1, 30), elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=True)),
    log2_scale=st.integers(-8, 24),
)
def test_a_scale_judges_the_values_as_held_times_the_scale(x, log2_scale):
    scale = 2.0**log2_scale  # GradScaler's scales are powers of 2: the thresholds divided by it stay exact
    got = numerics_stats(torch.from_numpy(x), torch.float16, scale=torch.tensor(scale))
    assert close(got, reference(x.astype(np.float64) * scale, torch.float16))


def test_nan_gives_nan_headroom_and_is_never_an_underflow():
    got = numerics_stats(torch.tensor([math.nan, 1e-6, 1.0]), torch.float16).tolist()
    assert math.isnan(got[0]) and got[1] == 0.0 and got[2] == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_low_precision_tensor_is_judged_in_its_own_dtype(dtype):
    x = torch.tensor([2.0, 0.5, 0.0]).to(dtype)
    assert judged_format(x) == dtype
    assert close(numerics_stats(x, judged_format(x)), reference(x.float().numpy(), dtype))


def test_a_float32_tensor_is_judged_in_the_autocast_dtype_inside_autocast_and_in_float32_outside():
    x = torch.ones(2)
    assert judged_format(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert judged_format(x) == torch.float16
        assert judged_format(x, torch.bfloat16) == torch.bfloat16  # the config's format overrides


@pytest.mark.parametrize("field, value", [("every", 0), ("format", "int8"), ("format", "float64"), ("gradients", 1)])
def test_bad_config_is_one_clear_error(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        NumericsConfig(**{field: value})


def _step(model, probe, dtype=None, autocast=None, step=0):
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return probe.measure(step_context(model, torch.optim.SGD(model.parameters(), lr=0.1), loss=loss, step=step))


def _names_and_values(out, family):
    return dict(zip(out[family].names, out[family].values.tolist(), strict=True))


def test_fp32_model_reads_fp32_range_and_float16_format_reads_fp16_range():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = NumericsProbe(every=1)
    probe.attach(model)
    out = _step(model, probe)
    heads = _names_and_values(out, keys.NUMERICS_HEADROOM_PER_NAME)
    assert {"act/blocks.0", "act/blocks.1", "logits/head", "grad/head.weight"} <= set(heads)
    assert 100 < float(out[keys.NUMERICS_HEADROOM]) == min(heads.values())  # fp32: ~128 doublings, nothing to fix
    assert float(out[keys.NUMERICS_UNDERFLOW]) == 0.0 and float(out[keys.NUMERICS_NEAR_MAX]) == 0.0
    probe.detach()
    model.zero_grad()
    as_fp16 = NumericsProbe(every=1, format="float16")
    as_fp16.attach(model)
    fp16 = _names_and_values(_step(model, as_fp16), keys.NUMERICS_HEADROOM_PER_NAME)
    for name, value in fp16.items():  # the same tensors, 128 - 16 = 112 doublings fewer
        assert value == pytest.approx(heads[name] - math.log2(torch.finfo(torch.float32).max / 65504), abs=1e-3)


def test_block_output_values_match_the_reference_on_a_bf16_model():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16).to(torch.bfloat16)
    probe = NumericsProbe(every=1)
    probe.attach(model)
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().float().numpy()))
    out = _step(model, probe)
    handle.remove()
    got = [
        _names_and_values(out, family)["act/blocks.0"]
        for family in (
            keys.NUMERICS_HEADROOM_PER_NAME,
            keys.NUMERICS_NEAR_MAX_PER_NAME,
            keys.NUMERICS_UNDERFLOW_PER_NAME,
        )
    ]
    assert close(torch.tensor(got, dtype=torch.float64), reference(seen[0], torch.bfloat16))


def test_fp16_autocast_judges_block_outputs_and_gradients_in_fp16():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = NumericsProbe(every=1)
    probe.attach(model)
    out = _step(model, probe, autocast=torch.float16)
    heads = _names_and_values(out, keys.NUMERICS_HEADROOM_PER_NAME)
    assert heads["act/blocks.0"] < 20 and heads["grad/head.weight"] < 30  # fp16's 2^16 range, not fp32's 2^128
    grad = model.head.weight.grad.numpy()
    want = reference(grad, torch.float16)
    assert heads["grad/head.weight"] == pytest.approx(want[0], rel=1e-5)
    assert _names_and_values(out, keys.NUMERICS_UNDERFLOW_PER_NAME)["grad/head.weight"] == pytest.approx(want[2])


def test_with_a_grad_scaler_gradients_are_judged_at_the_scale_the_backward_held_them():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with_scaler, without = NumericsProbe(every=1, scaler=scaler), NumericsProbe(every=1)
    with_scaler.attach(model)
    without.attach(model)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(tokens[:, :-1])
    scaler.scale(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(opt)  # as the Guard does before its probes measure
    ctx = step_context(model, opt)
    out = with_scaler.measure(ctx)
    scaled = _names_and_values(out, keys.NUMERICS_HEADROOM_PER_NAME)
    plain = _names_and_values(without.measure(ctx), keys.NUMERICS_HEADROOM_PER_NAME)
    assert scaled["grad/head.weight"] == pytest.approx(plain["grad/head.weight"] - 12, abs=1e-3)
    assert scaled["act/blocks.0"] == plain["act/blocks.0"]  # activations are not scaled
    want = reference(model.head.weight.grad.numpy().astype(np.float64) * 2.0**12, torch.float16)
    got = _names_and_values(out, keys.NUMERICS_UNDERFLOW_PER_NAME)
    assert got["grad/head.weight"] == pytest.approx(want[2])


def test_float8_training_watches_each_float8_linear_input_against_its_cast():
    float8 = pytest.importorskip("torchao.float8")
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float8.convert_to_float8_training(model, config=float8.Float8LinearConfig(emulate=True))
    probe = NumericsProbe(every=1)
    probe.attach(model)
    qkv = model.blocks[0].attn.qkv
    assert type(qkv).__name__ == "Float8Linear"
    seen = []
    handle = qkv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().numpy()))
    out = _step(model, probe)
    handle.remove()
    under = _names_and_values(out, keys.NUMERICS_UNDERFLOW_PER_NAME)
    assert "fp8_in/blocks.0.attn.qkv" in under
    want = reference(seen[0], torch.float32, torch.float8_e4m3fn)
    assert under["fp8_in/blocks.0.attn.qkv"] == pytest.approx(want[2])
    assert all(math.isfinite(v) for v in under.values())


def test_off_cadence_steps_measure_nothing_and_the_hooks_stay_idle():
    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    probe = NumericsProbe(every=2)
    probe.attach(model)
    assert _step(model, probe, step=0)  # step 0 is due
    assert _step(model, probe, step=1) == {} and probe._stats == {}  # hooks were disarmed for step 1
    assert _step(model, probe, step=2)


def test_a_failing_hook_becomes_one_keel_error_and_training_goes_on(tmp_path, monkeypatch):
    import keel.signals.numerics as numerics

    torch.manual_seed(0)
    model = create_proxy_model("tiny", seq_len=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(numerics, "numerics_stats", lambda *a, **k: 1 / 0)
    tokens = torch.randint(0, 256, (2, 17))
    with Guard(model, opt, run_dir=str(tmp_path), policy="observe", probes=["loss", NumericsProbe(every=1)]) as guard:
        for _ in range(2):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    assert [f.kind for f in guard.findings] == ["keel_error"]
