"""Each script in examples/ runs as a user would run it, and does what its docstring says."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keel.store import RunReader
from tests.distributed.launch import ROOT, torchrun

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_plain_loop_skips_the_injected_nan(tmp_path):
    out = run_example("plain_loop.py", "--steps", "60", "--inject-nan", "30", "--out", str(tmp_path))
    assert "step 30: skip" in out and "fc" not in out.split("step 30")[0]
    with RunReader(tmp_path) as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(30, "skip")]
        assert store.findings(min_severity="critical")[0].evidence["parameters"] == ["0.weight"]
        assert len(store.signal("loss")[0]) == 60


@pytest.mark.slow  # `make test-all`; tests/integrations/test_hf.py runs the real Trainer in the default suite
def test_hf_trainer_example_sees_the_nan_the_trainer_hides(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("hf_trainer.py", "--steps", "8", "--inject-nan", "5", "--out", str(tmp_path))
    assert "step 5: skip" in out
    with RunReader(tmp_path) as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(5, "skip")]
        steps, losses = store.signal("loss")
        assert steps.tolist() == list(range(8)) and losses[5] != losses[5]  # NaN


@pytest.mark.slow  # the same code paths run in tests/distributed; this checks the example file
@pytest.mark.distributed
def test_torchrun_example_every_rank_skips_and_the_bad_shard_is_named(tmp_path):
    out = torchrun(
        EXAMPLES / "torchrun_ddp.py",
        "--steps",
        "60",
        "--inject-nan",
        "20",
        "--bad-shard-from",
        "40",
        "--out",
        str(tmp_path),
    )
    assert "step 20: every rank skips" in out
    assert "rank 1 named" in out
    with RunReader(tmp_path) as store:
        assert (20, "skip") in [(d.step, d.action) for d in store.decisions()]
        named = {f.evidence["rank"] for f in store.findings() if f.kind == "rank_outlier"}
        assert named == {1}
    for rank in (0, 1):  # each rank's own disk snapshots; only rank 0 writes the store
        assert any((tmp_path / f"rank-{rank}" / "snapshots").glob("step-*"))
    assert not (tmp_path / "rank-1" / "run.sqlite").exists()


def test_every_example_is_one_the_docs_name():
    names = [
        "continual_eval.py",
        "data_attribution.py",
        "dqn_offpolicy.py",
        "hf_trainer.py",
        "nanogpt_style.py",
        "plain_loop.py",
        "torchrun_ddp.py",
        "trl_dpo.py",
    ]
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == names
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert all(f"examples/{name}" in docs for name in names)


@pytest.mark.slow  # a subprocess; tests/guard/test_data_attribution.py makes the same claims in-process
def test_the_data_attribution_example_runs_as_a_user_runs_it():
    out = run_example("data_attribution.py")
    assert "step 24: skip — transient fault" in out
    assert '"ids": "486"' in out
    assert "epochs/steps that drew the poisoned example: [(0, 30)]" in out


@pytest.mark.slow  # a subprocess; tests/integrations/test_watch.py runs the same example in-process by default
def test_the_nanogpt_style_example_runs_as_a_user_runs_it(tmp_path):
    out = run_example("nanogpt_style.py", "--max-iters", "34", "--bad-iters", "30,31,32", "--out", str(tmp_path))
    assert "iter 0: loss" in out
    with RunReader(tmp_path / "keel") as store:
        assert [(d.step, d.action) for d in store.decisions()] == [(30, "skip"), (31, "skip"), (32, "rollback")]


@pytest.mark.slow  # a subprocess (~12 s of CPU); tests/guard/test_evaluation.py finds a scripted gap in-process
def test_the_continual_eval_example_finds_the_stability_gap_after_the_switch(tmp_path):
    out = run_example("continual_eval.py", "--out", str(tmp_path))
    # step 103: the second low eval in a row (the detector confirms with two since b69feaa; BENCHMARKS, issue 18)
    assert "step 103: stability_gap warning: eval/a" in out and "continual/min_acc = " in out
    with RunReader(tmp_path) as store:
        gaps = [f for f in store.findings() if f.kind == "stability_gap"]
        assert gaps[0].evidence["switch_step"] == 100 and gaps[0].evidence["depth"] > 0.1
        phases = [{k: p[k] for k in ("index", "name", "step")} for p in store.meta()["phases"]]
        assert phases == [{"index": 0, "name": "a", "step": 0}, {"index": 1, "name": "b", "step": 100}]
        assert "spike(loss)" in store.meta()["phases"][1]["rebaselined"]  # Guard.phase's rebaseline, recorded
