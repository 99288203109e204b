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
    assert [c.base for c in charts] == ["loss", "grad/norm", "lr", "attn/max_logit", "logits/log_z", "time/step"]
    assert charts[1].title == "gradient norm (grad/norm)"
    attn = charts[3]
    assert attn.keys == ["attn/max_logit"] and attn.layers == [
        "attn/max_logit/blocks.0.attn",
        "attn/max_logit/blocks.1.attn",
    ]
    assert charts[1].log_y and not charts[0].log_y and left_out == []
    assert not any("grad/norm/" in k for c in charts for k in c.keys + c.layers)


def test_marks_go_to_the_chart_of_their_signal(tmp_path):
    runs = _runs(tmp_path)
    charts, _ = plan_charts(runs)
    by_id = {c.id: c.title for c in charts}
    placed = {(by_id[cid], m["run"], m["type"], m["step"]) for cid, ms in marks(runs, charts).items() for m in ms}
    assert ("loss", 1, "critical", 150) in placed and ("loss", 1, "critical", 200) in placed
    assert ("attn/max_logit", 0, "warning", 150) in placed
    assert ("loss", 1, "skip", 150) in placed and ("gradient norm (grad/norm)", 1, "skip", 150) in placed
    assert {t for t, r, kind, s in placed if kind == "rollback"} == set(by_id.values())  # on every chart
    assert ("loss", 0, "snapshot", 100) in placed
    assert not any(kind == "skip" and r == 0 for _, r, kind, _ in placed)  # the observe run skipped nothing


def test_a_signal_without_a_chart_falls_back_to_the_loss_chart(tmp_path):
    charts, _ = plan_charts(_runs(tmp_path))
    assert chart_of("curvature/sharpness", charts).title == "loss"
    assert chart_of("attn/max_logit/blocks.1.attn", charts).title == "attn/max_logit"


def test_per_head_members_companions_and_activations_group_onto_one_chart_each(tmp_path):
    import numpy as np

    from keel.report.run_data import RunData

    keys = [
        "loss",
        "attn/entropy",
        "attn/entropy/b0",
        "attn/entropy/b1",
        "attn/head_entropy/b0/h0",
        "attn/head_entropy/b0/h1",
        "attn/head_entropy/b1/h0",
        "logits/log_z",
        "logits/log_z_max",
        "logits/log_z_min",
        "act/rms",
        "act/rms/b0",
        "grad/norm",
        "grad/norm/fc.weight",
        "param/norm",
        "param/norm/fc.weight",
        "curvature/sharpness",
    ]
    run = RunData(name="r", path=tmp_path, series={k: (np.arange(3), np.ones(3)) for k in keys})
    charts, _ = plan_charts([run])
    assert [(c.base, c.keys, c.layers) for c in charts] == [
        ("loss", ["loss"], []),
        ("grad/norm", ["grad/norm"], []),
        ("attn/entropy", ["attn/entropy"], ["attn/entropy/b0", "attn/entropy/b1"]),
        ("attn/head_entropy", [], ["attn/head_entropy/b0/h0", "attn/head_entropy/b0/h1", "attn/head_entropy/b1/h0"]),
        ("logits/log_z", ["logits/log_z", "logits/log_z_max", "logits/log_z_min"], []),
        ("act/rms", ["act/rms"], ["act/rms/b0"]),
        ("curvature/sharpness", ["curvature/sharpness"], []),
        ("param/norm", ["param/norm"], []),
    ]
    assert charts[3].main == "attn/head_entropy/b0/h0"
    assert chart_of("attn/head_entropy/b1/h0", charts).base == "attn/head_entropy"


def test_preference_and_rl_signals_are_charted_after_the_transformer_ones_in_a_panel_of_their_own(tmp_path):
    import numpy as np

    from keel.report.charts import is_preference_rl
    from keel.report.page import build_page
    from keel.report.run_data import RunData

    keys = ["loss", "grad/norm", "attn/entropy", "curvature/sharpness", "pref/margin", "rl/entropy"]
    keys += ["rm/reward/0", "rm/reward/1", "trl/num_tokens"]
    run = RunData(name="r", path=tmp_path, series={k: (np.arange(3), np.ones(3)) for k in keys})
    charts, _ = plan_charts([run])
    assert [c.base for c in charts] == [
        "loss",
        "grad/norm",
        "attn/entropy",
        "pref/margin",
        "rl/entropy",
        "rm/reward",
        "curvature/sharpness",
        "trl/num_tokens",
    ]
    assert [c.base for c in charts if is_preference_rl(c)] == ["pref/margin", "rl/entropy", "rm/reward"]
    page = build_page([run])
    timelines, panel = page.index("<h2>Timelines</h2>"), page.index("<h2>Preference and RL signals</h2>")
    ids = {c.base: page.index(f"id='{c.id}'") for c in charts}
    assert timelines < ids["attn/entropy"] < ids["trl/num_tokens"] < panel
    assert panel < ids["pref/margin"] < ids["rl/entropy"] < ids["rm/reward"]


def test_a_run_without_preference_or_rl_signals_has_no_such_panel(tmp_path):
    from keel.report.page import build_page

    runs = _runs(tmp_path)
    assert "Preference and RL signals" not in build_page(runs)
