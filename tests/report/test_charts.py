from pathlib import Path

from keel.report.charts import chart_of, marks, plan_charts
from keel.report.run_data import load_run
from tests.report.stores import make_run_store


def _runs(tmp_path: Path):
    a = load_run(make_run_store(tmp_path / "bare", policy="observe", skip_at=None))
    b = load_run(make_run_store(tmp_path / "guarded", seed=1, rollback=(100, 160), nan_at=200))
    return [a, b]


def test_chart_order_layers_and_no_per_parameter_timelines(tmp_path):
    charts, left_out = plan_charts(_runs(tmp_path))
    assert [c.title for c in charts] == ["loss", "gradient norm", "learning rate", "attn/max_logit",
                                        "logits/log_z", "time/step"]
    attn = charts[3]
    assert attn.keys == ["attn/max_logit"] and attn.layers == ["attn/max_logit/blocks.0.attn",
                                                              "attn/max_logit/blocks.1.attn"]
    assert charts[1].log_y and not charts[0].log_y and left_out == []
    assert not any("grad/norm/" in k for c in charts for k in c.keys + c.layers)


def test_marks_go_to_the_chart_of_their_signal(tmp_path):
    runs = _runs(tmp_path)
    charts, _ = plan_charts(runs)
    by_id = {c.id: c.title for c in charts}
    placed = {(by_id[cid], m["run"], m["type"], m["step"])
              for cid, ms in marks(runs, charts).items() for m in ms}
    assert ("loss", 1, "critical", 150) in placed and ("loss", 1, "critical", 200) in placed
    assert ("attn/max_logit", 0, "warning", 150) in placed
    assert ("loss", 1, "skip", 150) in placed and ("gradient norm", 1, "skip", 150) in placed
    assert {t for t, r, kind, s in placed if kind == "rollback"} == set(by_id.values())  # on every chart
    assert ("loss", 0, "snapshot", 100) in placed
    assert not any(kind == "skip" and r == 0 for _, r, kind, _ in placed)  # the observe run skipped nothing


def test_a_signal_without_a_chart_falls_back_to_the_loss_chart(tmp_path):
    charts, _ = plan_charts(_runs(tmp_path))
    assert chart_of("curvature/sharpness", charts).title == "loss"
    assert chart_of("attn/max_logit/blocks.1.attn", charts).title == "attn/max_logit"
