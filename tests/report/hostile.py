"""Crafted stores for the report's security tests: script payloads and values of the wrong type in every field.

Every payload, if it ever ran, would set ``data-pwned`` on the page's <html> element (the browser test looks for
it); the page must show them all as text.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

_ACT = "document.documentElement.setAttribute(`data-pwned`,`{}`)"


def payloads(tag: str) -> list[str]:
    """The payloads of one field, each marked with ``tag`` (to tell which field got through)."""
    act = _ACT.format(tag)
    return [
        f"<script>{act}</script>",
        f'"><img src=x onerror={act}>',
        f"'><svg onload={act}>",
        f"</script><script>{act}</script>",
        f"<!--<script>{act}</script>-->",
        f"javascript:{act}",
        f"<a href=\"javascript:{act}\">link</a> <a href='https://example.com'>out</a>",
        f'<iframe srcdoc="<script>parent.{act}</script>"></iframe>',
        "\u2028\u2029 %{x} %{y <b>&amp;</b> ]]> \\u003c",
    ]


def hostile(tag: str) -> str:
    return " ".join(payloads(tag))


# A run folder name may hold HTML too (everything but "/").
RUN_NAME = f'"><img src=x onerror={_ACT.format("dir")}>'
HUGE = "A" * 200_000
COLUMNS = {
    "meta": ("key", "value"),
    "signals": ("step", "key", "value"),
    "findings": ("step", "kind", "severity", "signal", "value", "baseline", "evidence", "cause", "advice"),
    "decisions": ("step", "action", "reason", "actor", "onset", "restored_step"),
    "snapshots": ("step", "path", "checksum", "created"),
}
INT64 = (-(2**63), 2**63 - 1)


def crafted(path: Path, columns: dict[str, tuple[str, ...]], rows: dict[str, list[tuple]]) -> Path:
    """An SQLite file with these tables and no column types, so every value keeps the type it was given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for table, names in columns.items():
        conn.execute(f"CREATE TABLE {table} ({', '.join(names)})")
        conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(names))})", rows.get(table, []))
    conn.commit()
    conn.close()
    return path


def hostile_run_store(root: Path, *, steps: int = 60) -> Path:
    """A run store (in a folder named with HTML) with payloads in every text field and values of the wrong
    type in every column; returns the run folder."""
    run = root / RUN_NAME
    meta = {
        key: hostile(f"meta.{key}")
        for key in ("status", "policy", "model", "optimizer", "started_at", "finished_at", "git_sha")
    }
    meta.update(
        steps=hostile("meta.steps"),
        seed=hostile("meta.seed"),
        config={hostile("config.key"): hostile("config.value"), "lr": float("inf"), "big": HUGE},
        environment={"hardware": hostile("env.hardware"), "versions": {hostile("env.k"): hostile("env.v")}},
        diagnosis=[
            {"kind": hostile("diag.kind"), "title": hostile("diag.title"), "when": hostile("diag.when")},
            hostile("diag.item"),
            5,
            None,
        ],
        **{hostile("meta.key"): hostile("meta.value")},
    )
    meta_rows = [(k, json.dumps(v)) for k, v in meta.items()]
    meta_rows += [
        ("bad json", "{<script>"),
        ("blob", b"<script>"),
        (7, '"int key"'),
        ("deep", "[" * 50_000 + "]" * 50_000),
    ]
    family = f"attn/max_logit/{hostile('signal.layer')}"
    signal_rows = []
    for step in range(steps):
        signal_rows += [
            (step, "loss", 3.0 - step / steps),
            (step, "grad/norm", 1.0 + (step == 30) * 1e308),
            (step, hostile("signal.key"), float(step)),
            (step, family, 2.0),
            (step, "attn/max_logit", 4.0),
            (step, "lr", None),
        ]
    signal_rows += [
        (5, "loss", float("inf")),
        (6, "loss", float("-inf")),
        (hostile("signal.step"), "loss", 1.0),
        (b"\x00<", "loss", 1.0),
        (1.5, "loss", 1.0),
        (7, "loss", hostile("signal.value")),
        (8, "loss", b"blob"),
        (9, b"<blob key>", 1.0),
    ]
    evidence = {
        hostile("ev.key"): hostile("ev.value"),
        "nested": {"x": [hostile("ev.list")]},
        "advice": [
            {"action": hostile("rem.action"), "how": hostile("rem.how"), "source": hostile("rem.source")},
            hostile("rem.item"),
        ],
        "traceback": hostile("ev.traceback"),
    }
    findings = [
        (
            20,
            hostile("f.kind"),
            "critical",
            hostile("f.signal"),
            float("inf"),
            None,
            json.dumps(evidence),
            hostile("f.cause") + HUGE,
            hostile("f.advice"),
        ),
        (
            25,
            "loss_spike",
            "warning",
            "loss",
            -1e308,
            1e308,
            json.dumps({"z": hostile("f2.z")}),
            hostile("f2.cause"),
            "",
        ),
        (INT64[1], "far", "info", "loss", 1.0, 1.0, "{}", hostile("f3.cause"), ""),
        (-5, "before", "warning", family, 1.0, 1.0, "{}", hostile("f4.cause"), ""),
        # The attack of issue 12, item 8: markup in an integer column.
        (f"30<img src=x onerror={_ACT.format('f.step')}>", "loss_spike", "critical", "loss", 1.0, 1.0, "{}", "c", "r"),
        (31, "k", "critical", "loss", hostile("f.value"), 1.0, "{}", "c", "r"),
        (32, "k", hostile("f.severity"), "loss", 1.0, 1.0, "{}", "c", "r"),
        (33, "k", "critical", "loss", 1.0, 1.0, hostile("f.evidence"), "c", "r"),
        (34, "k", "critical", "loss", 1.0, 1.0, "[1]", "c", "r"),
        (35, b"<blob>", "critical", "loss", 1.0, 1.0, "{}", "c", "r"),
    ]
    decisions = [
        (20, "skip", hostile("d.reason"), hostile("d.actor"), None, None),
        (40, "rollback", hostile("d2.reason"), "keel", 30, 10),
        (INT64[0], "abort", hostile("d3.reason"), "keel", INT64[0], INT64[1]),
        (hostile("d.step"), "skip", "r", "keel", None, None),
        (41, "rollback", "r", "keel", hostile("d.onset"), 10),
        (42, "rollback", "r", "keel", 30, hostile("d.restored_step")),
        (43, hostile("d.action"), "r", "keel", None, None),
        (44, "skip", b"<blob>", "keel", None, None),
        (45, "skip", "r", "keel", 1.5, None),
    ]
    snapshots = [
        (0, hostile("s.path"), hostile("s.checksum"), 1.0),
        (INT64[1], "p", "c", 2.0),
        (hostile("s.step"), "p", "c", 1.0),
        (10, "p", "c", hostile("s.created")),
        (11, b"<blob>", "c", 1.0),
    ]
    crafted(
        run / "run.sqlite",
        COLUMNS,
        {
            "meta": meta_rows,
            "signals": signal_rows,
            "findings": findings,
            "decisions": decisions,
            "snapshots": snapshots,
        },
    )
    return run


SWEEP_NAME = f"'><svg onload={_ACT.format('sweep.dir')}>"


def hostile_sweep_store(root: Path) -> Path:
    """A sweep store (in a folder named with HTML) with payloads in every text field of its rows, meta and
    stored summary, and values of the wrong type in every column and summary field; returns the sweep folder."""
    from keel.store.sweep_schema import SUMMARY_KEY

    sweep = root / SWEEP_NAME
    names = (
        "run_id",
        "recipe",
        "size",
        "lr",
        "seed",
        "status",
        "config",
        "init_loss",
        "final_loss",
        "val_loss",
        "max_attn_logit",
        "log_z",
        "grad_norm",
        "n_params",
        "steps_done",
        "wall_s",
        "error",
        "run_dir",
        "attempts",
        "started",
        "finished",
    )

    def row(i: int, **change) -> tuple:
        values = dict(
            run_id=hostile(f"row{i}.run_id"),
            recipe=hostile("row.recipe"),
            size=hostile("row.size"),
            lr=10.0 ** -(i % 4 + 1),
            seed=i,
            status=hostile("row.status"),
            config=json.dumps({hostile("row.config.key"): hostile("row.config.value")}),
            init_loss=5.5,
            final_loss=float("inf"),
            val_loss=None,
            max_attn_logit=1e308,
            log_z=-1e308,
            grad_norm=float("-inf"),
            n_params=INT64[1],
            steps_done=INT64[0],
            wall_s=1.0,
            error=f"Traceback\n{hostile('row.error')}",
            run_dir=hostile("row.run_dir"),
            attempts=1,
            started=None,
            finished=None,
        )
        values.update(change)
        return tuple(values[n] for n in names)

    rows = [
        row(0),
        row(1, status="done", error=None),
        row(2, status="diverged"),
        row(3, lr=hostile("row.lr")),
        row(4, seed=hostile("row.seed")),
        row(5, n_params=b"<blob>"),
        row(6, config="{<script>"),
        row(7, status=None),
        row(8, attempts=1.5),
        row(9, val_loss=hostile("v")),
    ]
    text = hostile("sum.text")
    curve = {
        "name": hostile("sum.recipe"),
        "size": hostile("sum.size"),
        "n_params": 123,
        "lr_sensitivity": 0.5,
        "best_lr": 1e-3,
        "best_loss": 2.0,
        "init_loss": 5.5,
        "lr_range": [1e-3, 1e-2],
        "sensitivity_vs_baseline": None,
        "lrs": [1e-3, 1e-2, 1e-1],
        "losses": [2.0, 2.5, 1e308],
        "max_attn_logit": [None, -5.0, 1e308],
        "diverged": 1,
        "errors": 0,
    }
    view = {
        "recipe": hostile("sum.view"),
        "lr": 1e-3,
        "sizes": [hostile("sum.vsize"), "b"],
        "n_params": [10, 100],
        "max_attn_logit": [1.0, None],
        "grad_norm": [1.0, 2.0],
        "logit_exponent": 400.0,
        "logit_log10_prefactor": -1e308,
        "grad_norm_exponent": 1.0,
        "grad_norm_log10_prefactor": 0.0,
        "divergence_logit": 10.0,
        "threshold_source": text,
        "predicted_divergence_params": 50.0,
        "reach": hostile("sum.reach"),
    }
    summary = {
        "recipes": [
            curve,
            curve | {"lrs": text},
            curve | {"n_params": text},
            curve | {"size": 5},
            text,
            curve | {"losses": [float("nan")] * 3},
        ],
        "scaling": [view, view | {"sizes": [text]}, view | {"reach": ["x"]}, None],
        "runs": {hostile("sum.status"): 1},
    }
    meta = {
        SUMMARY_KEY: summary,
        "sweep": {hostile("meta.sweep.key"): [hostile("meta.sweep.value")]},
        hostile("meta.key"): hostile("meta.value"),
    }
    meta_rows = [(k, json.dumps(v)) for k, v in meta.items()] + [("bad", "{<script>"), (b"<blob>", "1")]
    crafted(sweep / "sweep.sqlite", {"meta": ("key", "value"), "runs": names}, {"meta": meta_rows, "runs": rows})
    return sweep
