"""The diagnosis reaches the run store (meta ``diagnosis``) and `keel doctor`'s output, with cause and advice."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from keel import Guard
from keel.cli import main
from keel.proxy.trainer import TrainConfig, train_proxy
from keel.store import RunReader
from tests.conftest import TinyNet, make_batches, observe_poisoned_run


def test_guard_stores_named_causes_with_first_sighting_lead_time_and_sourced_advice(tmp_path):
    guard = observe_poisoned_run(tmp_path / "run")  # batch 60's loss jumps ~900×
    with RunReader(tmp_path / "run") as run:
        stored = run.meta()["diagnosis"]
    assert stored == [d.to_dict() for d in guard.recorder.diagnoses] and stored
    first = stored[0]
    assert (first["kind"], first["first_step"], first["severity"]) == ("loss_spike", 60, "critical")
    # the loss degraded at the spike itself: seen at once, no earlier
    assert (first["degraded_step"], first["lead_steps"]) == (60, 0)
    assert all(r["source"] for r in first["advice"]) and "first seen at step 60" in first["summary"]


def test_clean_run_stores_an_empty_diagnosis(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with Guard(model, opt, policy="observe", run_dir=str(tmp_path / "run")) as guard:
        for x, y in make_batches(30):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            guard.step(loss)
            opt.zero_grad(set_to_none=True)
    with RunReader(tmp_path / "run") as run:
        assert run.meta()["diagnosis"] == []


def test_doctor_shows_the_diagnosis_of_an_attention_logit_growth_run(tmp_path, capsys):
    # keel's tiny proxy at LR 0.1 without QK-norm (the zoo's attention_logit_growth), cut to 30 steps
    train_proxy(TrainConfig(size="tiny", steps=30, lr=0.1), policy="observe", run_dir=str(tmp_path / "run"))
    with RunReader(tmp_path / "run") as run:
        (first, *_) = run.meta()["diagnosis"]
    assert first["kind"] == "attention_logit_growth" and first["advice"][0]["action"].startswith("add QK-norm")
    assert main(["doctor", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "diagnosis (recorded by the Guard at the end of the run):" in out
    block = out[out.index("diagnosis (recorded") :]
    assert f"1. Attention-logit growth (first seen at step {first['first_step']}" in " ".join(block.split())
    assert "QK-norm" in block and "Dehghani" in block
    assert main(["doctor", str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    # the replayed findings name the same cause, first seen at the same step
    assert summary["diagnosis"][0]["kind"] == "attention_logit_growth"
    assert summary["diagnosis"][0]["first_step"] == first["first_step"]
