"""A spike at a step the training code skipped itself (OLMo-core's SkipStepOptimizer: ``optim/step skipped=1.0000``)
says it was skipped already instead of advising to skip it (h24 leftover), on the OLMo-core reader's fixtures."""

from keel._core import Decision, Finding
from keel.detect.diagnosis import diagnose, skipped_already
from keel.doctor import examine_log
from keel.doctor.formats import read_log
from tests.doctor.test_olmo_log import _skipping_run


def _olmo_log(tmp_path, skipped_at=(40, 50), value="1.0000"):
    p = tmp_path / "train.log"
    p.write_text(_skipping_run(skipped_at=skipped_at, value=value))
    return examine_log(p), read_log(p).decisions


def test_spikes_olmo_core_skipped_say_so_and_are_not_advised_to_be_skipped(tmp_path):
    result, decisions = _olmo_log(tmp_path)
    assert [(d.step, d.by) for d in decisions] == [(40, "trainer"), (50, "trainer")]
    spikes = [f for f in result.findings if f.severity == "critical"]
    assert [(f.step, f.kind) for f in spikes] == [(40, "loss_spike"), (50, "loss_spike")]
    assert all(f.advice.startswith("Skip this update") for f in spikes)  # what the doctor said before
    marked = [f for f in skipped_already(result.findings, decisions) if f.severity == "critical"]
    assert [(f.step, f.severity, f.evidence["skipped_by"]) for f in marked] == [(40, "critical", "trainer")] + [
        (50, "critical", "trainer")
    ]
    assert all("the trainer skipped this update itself" in f.advice and "Skip this" not in f.advice for f in marked)
    (diagnosis,) = diagnose(skipped_already(result.findings, decisions))
    assert not diagnosis.advice[0]["action"].startswith("skip the update")  # was: 1. skip the update (policy='skip')
    assert diagnose(result.findings)[0].advice[0]["action"].startswith("skip the update")


def test_only_the_steps_the_trainer_skipped_and_only_what_a_skip_mends_change(tmp_path):
    result, _ = _olmo_log(tmp_path, skipped_at=(40,))
    others = [
        Decision(step=40, action="skip", by="keel"),  # keel's own skip: the Guard's store says so itself
        Decision(step=40, action="ok", by="trainer"),
    ]
    assert skipped_already(result.findings, others) == result.findings
    shift = Finding(step=40, kind="loss_spike", severity="critical", signal="loss", evidence={"level_shift": True})
    params = Finding(step=40, kind="non_finite", severity="critical", signal="param/norm")
    info = Finding(step=40, kind="loss_spike", severity="info", signal="loss")
    trainer = [Decision(step=40, action="skip", by="trainer")]
    assert skipped_already([shift, params, info], trainer) == [shift, params, info]  # no skip mends these
    assert skipped_already([], trainer) == [] and skipped_already(result.findings, []) == result.findings
