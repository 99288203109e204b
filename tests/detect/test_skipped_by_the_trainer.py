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
    marked = [f for f in result.findings if f.severity == "critical"]  # keel doctor marks them itself
    assert [(f.step, f.kind, f.evidence["skipped_by"]) for f in marked] == [(40, "loss_spike", "trainer")] + [
        (50, "loss_spike", "trainer")
    ]
    assert all("the trainer skipped this update itself" in f.advice and "Skip this" not in f.advice for f in marked)
    assert skipped_already(result.findings, decisions) == result.findings  # marking twice changes nothing
    (diagnosis,) = diagnose(result.findings)
    assert not diagnosis.advice[0]["action"].startswith("skip the update")  # was: 1. skip the update (policy='skip')
    unmarked = [f for f in result.findings if f.severity != "critical"]
    assert all("skipped_by" not in f.evidence for f in unmarked)


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
