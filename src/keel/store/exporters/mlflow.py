"""MLflow export: signals as metrics at their step (named as `metric_names` says), the run's config as
parameters, its status as tags, findings, decisions and metadata as JSON artifacts under ``keel/``. Needs
``mlflow`` (``pip install 'keel[mlflow]'``).

The store is local by default: ``sqlite:///<out>/mlflow.db`` with artifacts in ``<out>/artifacts`` (MLflow 3
keeps its ``file:`` store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; pass
``tracking_uri="file:<dir>"`` to use it anyway, or a server's URI).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from keel.store.exporters._table import RunTable

BATCH = 1000  # MLflow's limit of metrics per log_batch call


def metric_names(keys: list[str]) -> dict[str, str]:
    """keel key → MLflow metric name: the key itself, except that a key which also prefixes per-parameter keys
    (``grad/norm`` beside ``grad/norm/<param>``) becomes ``<key>/all`` — MLflow's file store keeps a metric in a
    file named by its key and cannot hold both.

    Example:
        >>> metric_names(["grad/norm", "grad/norm/fc.weight", "loss"])["grad/norm"]
        'grad/norm/all'
    """
    prefixes = {k.rsplit("/", i)[0] for k in keys for i in range(1, k.count("/") + 1)}
    return {k: f"{k}/all" if k in prefixes else k for k in keys}


def export(table: RunTable, out: Path, *, experiment: str = "keel", tracking_uri: str | None = None) -> list[Path]:
    """Log the run as one MLflow run named after the run directory, in ``experiment``; returns ``out``."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError("keel export --format mlflow needs mlflow: pip install 'keel[mlflow]'") from exc
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(
            experiment, artifact_location=None if tracking_uri else (out.resolve() / "artifacts").as_uri()
        )
    )
    run_id = client.create_run(experiment_id, run_name=table.name).info.run_id
    try:
        now = int(time.time() * 1000)
        names = metric_names(table.keys)
        params = [Param(k[:250], str(v)[:6000]) for k, v in _flatten(table.meta.get("config") or {}).items()]
        tags = [
            RunTag("keel.status", str(table.meta.get("status"))),
            RunTag("keel.policy", str(table.meta.get("policy"))),
            RunTag("keel.findings", str(len(table.findings))),
            RunTag("keel.decisions", str(len(table.decisions))),
        ]
        client.log_batch(run_id, params=params[:100], tags=tags)
        for i in range(100, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        metrics = (Metric(names[key], value, now, step) for step, values in table.rows for key, value in values.items())
        while batch := list(itertools.islice(metrics, BATCH)):
            client.log_batch(run_id, metrics=batch)
        client.log_text(run_id, json.dumps(table.finding_records(), indent=1), "keel/findings.json")
        client.log_text(run_id, json.dumps(table.decision_records(), indent=1), "keel/decisions.json")
        client.log_text(run_id, json.dumps(table.meta, indent=1, default=str), "keel/meta.json")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return [out]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
