"""The doctor's stretch-at-a-time driver finds exactly what `update` step by step finds (issue 12, item 13).

The reference is the same driver with every detector hidden behind a plain wrapper that offers only
``update``/``state_dict``/``load_state_dict``: no scan, no declared keys, so every detector reads every
observation — the per-step semantics the fast paths (`keel.detect.scan`) promise to keep. Logs are generated
with non-finite values, per-parameter families, the predictive detectors' signals, restarts and rollbacks, and
detectors that raise.
"""

import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.detect import DivergenceConfig, DivergenceDetector, SpikeConfig, SpikeDetector, default_detectors
from keel.detect.scan import ReadsKeys, SignalScan
from keel.doctor import RawLog, examine
from keel.doctor.blocks import Plan, _with_rest
from keel.doctor.timeline import build_timeline


class PerStep:
    """A detector with its fast paths hidden: the driver can only call ``update`` on every observation."""

    def __init__(self, det):
        self.det, self.name = det, det.name
        if hasattr(det, "config"):
            self.config = det.config

    def update(self, obs):
        return self.det.update(obs)

    def state_dict(self):
        return self.det.state_dict()

    def load_state_dict(self, state):
        self.det.load_state_dict(state)


class RaisesAt(SpikeDetector):
    """A spike detector with a bug at one step, in update and scan alike (a scan must equal its update)."""

    def __init__(self, step):
        super().__init__(SpikeConfig(signal="loss", window=8, min_history=4, kind="buggy_spike"))
        self.bad_step = step

    def update(self, obs):
        if obs.step == self.bad_step and not math.isnan(obs.values.get("loss", math.nan)):  # NaN: not logged
            raise RuntimeError(f"bug at {obs.step}")
        return super().update(obs)

    def scan(self, steps, values):
        if self.bad_step in steps[~np.isnan(values)]:
            raise RuntimeError(f"bug at {self.bad_step}")
        return super().scan(steps, values)


class ScanBug(SpikeDetector):
    """A scan that always raises, over an update that works: the stretch is read again step by step."""

    def __init__(self):
        super().__init__(SpikeConfig(signal="grad/norm", window=8, min_history=4, kind="scan_bug_spike"))

    def scan(self, steps, values):
        self.update_calls_before_raise = super().scan(steps[: len(steps) // 2], values[: len(values) // 2])
        raise ValueError("scan bug")


class RestingBug:
    """A ReadsKeys detector that raises on the first non-finite loss it sees."""

    name = "resting_bug"
    reads = ("loss",)
    rests_when_finite = True

    def __init__(self):
        self.seen = 0

    def update(self, obs):
        if not math.isfinite(obs.values.get("loss", 0.0)):
            raise ZeroDivisionError("non-finite")
        self.seen = 0
        return []

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def _detectors(bad_step):
    return [
        *default_detectors(),
        SpikeDetector(
            SpikeConfig(signal="loss", window=8, min_history=4, patience=2, rebase_after=6, kind="small_loss_spike")
        ),
        SpikeDetector(
            SpikeConfig(signal="grad/norm", log_scale=True, window=8, min_history=4, kind="small_grad_spike")
        ),
        DivergenceDetector(DivergenceConfig(short=5, min_history=6, patience=2)),
        RaisesAt(bad_step),
        ScanBug(),
        RestingBug(),
    ]


KEYS = [
    "loss",
    "grad/norm",
    "grad/norm/fc1.weight",
    "grad/norm/fc2.weight",
    "param/norm",
    "lr",
    "amp/scale",
    "act/max_abs",
    "act/max_abs/blocks.0",
    "act/max_abs/blocks.1",
    "attn/max_logit",
    "attn/entropy",
    "logits/log_z",
    "logits/softmax_collapse",
    "curvature/margin",
]
VALUES = st.one_of(
    st.sampled_from([1.0, 2.0, 2.0, 2.05, 1.95, 30.0, 0.0, 0.6, math.nan, math.inf, -math.inf]),
    st.floats(min_value=1.5, max_value=2.5),
    st.floats(min_value=0.0, max_value=60.0),
)


@st.composite
def logs(draw):
    records, step = [], draw(st.integers(-3, 3))
    steady = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=5, unique=True))
    for _ in range(draw(st.integers(1, 90))):
        step += draw(st.sampled_from([1, 1, 1, 1, 2, 0, -6]))
        keys = set(steady) | set(draw(st.lists(st.sampled_from(KEYS), max_size=3)))
        records.append((step, {k: draw(VALUES) for k in KEYS if k in keys}))
    return records


@pytest.fixture
def small_stretches(monkeypatch):
    """Checkpoints (and so stretches) every 5 observations, 2 kept dense: short logs cross many of them."""
    monkeypatch.setattr(sys.modules["keel.doctor.examine"], "CHECKPOINT_EVERY", 5)
    monkeypatch.setattr(sys.modules["keel.doctor.examine"], "RECENT_CHECKPOINTS", 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=logs(),
    rollbacks=st.dictionaries(st.integers(0, 60), st.integers(-2, 60), max_size=3),
    bad_step=st.integers(0, 60),
)
def test_stretches_find_what_update_step_by_step_finds(records, rollbacks, bad_step, small_stretches):
    log = RawLog(source="gen", format="keel_store", records=records, keyed=True, rollbacks=rollbacks)
    fast = examine(log, detectors=lambda: _detectors(bad_step)).to_dict()
    slow = examine(log, detectors=lambda: [PerStep(d) for d in _detectors(bad_step)]).to_dict()
    for result in (fast, slow):
        del result["summary"]["detectors"]  # readiness is told for the detector classes it knows, not wrappers
        for f in result["findings"]:
            f["evidence"].pop("traceback", None)  # its frames differ by the wrapper's
    assert fast == slow


def test_the_generated_logs_reach_every_fast_path():
    # The comparison above means something only if the logs make the fast paths find things and break.
    seen = {"non_finite": 0, "spike": 0, "predictive": 0, "keel_error": 0, "restarts": 0}

    @settings(max_examples=80, deadline=None, database=None, derandomize=True)  # a fixed sample: counts are stable
    @given(records=logs(), bad_step=st.integers(0, 60))
    def count(records, bad_step):
        result = examine(
            RawLog(source="gen", format="keel_store", records=records, keyed=True),
            detectors=lambda: _detectors(bad_step),
        )
        kinds = {f.kind for f in result.findings}
        seen["non_finite"] += "non_finite" in kinds or "non_finite_origin" in kinds
        seen["spike"] += any(k.endswith("spike") for k in kinds)
        seen["predictive"] += bool(
            kinds
            & {
                "softmax_collapse",
                "attention_logit_growth",
                "edge_of_stability",
                "output_logit_drift",
                "attention_entropy_collapse",
            }
        )
        seen["keel_error"] += "keel_error" in kinds
        seen["restarts"] += bool(result.summary["restarts"]["count"])

    count()
    assert all(v >= 3 for v in seen.values()), seen


def test_a_detector_that_raises_is_switched_off_at_that_step_with_one_note():
    records = [(s, {"loss": 2.0 + 0.01 * (s % 3)}) for s in range(40)]
    result = examine(
        RawLog(source="x", format="keel_store", records=records, keyed=True),
        detectors=lambda: [RaisesAt(17), ScanBug(), RestingBug()],
    )
    errors = [(f.step, f.signal) for f in result.findings if f.kind == "keel_error"]
    assert errors == [(17, "spike")]  # the scan raised, and update named step 17; ScanBug read no grad/norm
    assert [n for n in result.summary["notes"] if "switched off" in n] == [
        "the 'spike' (loss) detector raised RuntimeError at step 17 and was switched off for the rest of the log"
    ]


def test_each_default_detector_takes_a_fast_path():
    log = RawLog(source="x", format="keel_store", records=[(0, {"loss": 1.0, "grad/norm": 1.0})], keyed=True)
    dets = default_detectors()
    plan = Plan(dets, build_timeline(log))
    assert all(isinstance(d, SignalScan | ReadsKeys) for d in dets)
    # the rest idle on a log without their keys: loss-scale thrash (no scaler), the LR surge (no lr), ε-dominance and
    # QAT oscillation (opt-in probes), activation growth, lora_blowup and stability_gap (no adapters, evals or
    # phases), the normalization-statistics jump (no BatchNorm), the three MoE detectors (no router)
    assert plan.modes == ["scan"] * 3 + ["rest"] * 2 + ["idle"] * 16


@pytest.mark.parametrize(
    ("non_finite", "first", "stop", "expected"),
    [
        ([], 0, 10, [9]),
        ([3], 0, 10, [2, 3, 9]),
        ([0, 1, 2], 0, 3, [0, 1, 2]),
        ([0, 5], 0, 6, [0, 4, 5]),
        ([12], 10, 13, [11, 12]),
        ([10], 10, 11, [10]),
    ],
)
def test_rest_reads_the_non_finite_and_the_last_of_each_quiet_run(non_finite, first, stop, expected):
    assert _with_rest(np.array(non_finite, dtype=np.int64), first, stop).tolist() == expected
