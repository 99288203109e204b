"""SweepData: what the report shows of an LR-sensitivity sweep, read from its store through `keel.store.SweepReader`.

The numbers that summarise a sweep (LR sensitivity per recipe and size, the scaling view and its power-law fits)
are computed by `keel.proxy.sweep`, which stores them in the sweep store when a sweep finishes; the report may
not import that package (it is training code), so it shows the summary as stored, next to the store's rows.
Like everything read from a file, the summary is untrusted: each entry is checked field by field, and an entry
with a value of the wrong type is left out and named in ``problems``, as are the rows the reader left out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.report.run_data import read_part
from keel.store import SweepReader, store_folder
from keel.store.sweep_schema import SUMMARY_KEY


@dataclass(frozen=True, kw_only=True)
class Curve:
    """One recipe at one size: its loss-vs-LR curve and LR sensitivity (the ``recipes`` entries of the summary).

    Attributes:
        recipe: Recipe name.
        size: Proxy size.
        n_params: Non-embedding parameters.
        lr_sensitivity: LRS, in nats.
        vs_baseline: How many times less LR-sensitive than the baseline (None: no baseline at this size).
        best_lr: The LR of the lowest capped loss.
        best_loss: That loss.
        init_loss: ℓ₀, the loss at initialisation that caps diverged runs.
        lr_range: The near-optimal LR range (lowest, highest).
        lrs: The curve's LRs, ascending.
        losses: The capped, seed-averaged final loss per LR.
        max_attn_logit: End-of-run max attention logit per LR (None: not measured).
        router_z: End-of-run router z per LR (None: not measured: a dense model, or a summary stored before
            the sweep carried the router), as `load_imbalance` and `dead_experts`.
        load_imbalance: End-of-run load imbalance (max/mean tokens per expert) per LR.
        dead_experts: End-of-run number of experts that received no token, per LR.
        diverged: Runs that diverged.
        errors: Runs that raised.
    """

    recipe: str
    size: str
    n_params: int
    lr_sensitivity: float
    vs_baseline: float | None
    best_lr: float
    best_loss: float
    init_loss: float
    lr_range: tuple[float, float]
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    max_attn_logit: tuple[float | None, ...]
    router_z: tuple[float | None, ...]
    load_imbalance: tuple[float | None, ...]
    dead_experts: tuple[float | None, ...]
    diverged: int
    errors: int

    @property
    def has_router(self) -> bool:
        """Whether any LR has a router value (an MoE recipe): the router table and figures show the curve."""
        return any(v is not None for v in (*self.router_z, *self.load_imbalance, *self.dead_experts))


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """One recipe's end-of-run signals at one LR across sizes (the ``scaling`` entries of the summary).

    Attributes:
        recipe: Recipe name.
        lr: The fixed LR.
        sizes: Proxy sizes, smallest first.
        n_params: Non-embedding parameters per size.
        max_attn_logit: Max attention logit per size (None: not measured).
        grad_norm: Gradient norm per size.
        logit_fit: (exponent, log10 prefactor) of the logit's power law over size, or None.
        grad_norm_fit: The same for the gradient norm.
        divergence_logit: The logit taken as divergence (None: none).
        predicted_divergence_params: The size at which the logit fit reaches it (None: never, or no fit).
        growth: The logit's growth in words (``logit ∝ N^0.29``).
        reach: Where the fit reaches the threshold, in the sweep's own words.
    """

    recipe: str
    lr: float
    sizes: tuple[str, ...]
    n_params: tuple[int, ...]
    max_attn_logit: tuple[float | None, ...]
    grad_norm: tuple[float | None, ...]
    logit_fit: tuple[float, float] | None
    grad_norm_fit: tuple[float, float] | None
    divergence_logit: float | None
    predicted_divergence_params: float | None
    reach: str

    @property
    def growth(self) -> str:
        return f"logit ∝ N^{self.logit_fit[0]:.2f}" if self.logit_fit else "logit: < 2 sizes"


@dataclass(kw_only=True)
class SweepData:
    """One sweep as the report sees it.

    Attributes:
        name: Display name (the sweep folder's name).
        path: The sweep folder.
        meta: The sweep's config and environment (the summary taken out).
        rows: One dict per run (see `keel.store.SweepReader.rows`).
        curves: The stored summary's curves.
        scaling: The stored summary's scaling views.
        problems: What could not be read or is out of date, in words.
    """

    name: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    scaling: list[Scaling] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_sweep_data(path: str | Path, *, name: str | None = None) -> SweepData:
    """Read a sweep store for the report.

    Args:
        path: The sweep folder or its ``sweep.sqlite``.
        name: Display name; default the folder's name.

    Raises:
        FileNotFoundError: No sweep store at ``path``.
        StoreError: The file is not an SQLite store.
    """
    path = Path(path)
    folder = store_folder(path)
    sweep = SweepData(name=name or folder.name, path=folder)
    with SweepReader(path) as reader:
        sweep.meta = read_part(sweep.problems, "metadata", reader.meta, {})
        sweep.rows = read_part(sweep.problems, "runs", reader.rows, [])
        sweep.problems += reader.problems
    if not sweep.rows:
        sweep.problems.append("this sweep has no runs yet")
    _read_summary(sweep, sweep.meta.pop(SUMMARY_KEY, None))
    return sweep


def _read_summary(sweep: SweepData, summary: Any) -> None:
    if summary is None:
        sweep.problems.append(
            "no summary stored: `keel sweep` stores one when it finishes (the sweep's own "
            "command, run again, resumes it and stores one); its runs are listed below"
        )
        return
    if not isinstance(summary, dict):
        sweep.problems.append(f"the stored summary is {type(summary).__name__}, not an object; left out")
        return
    sweep.curves = _entries(sweep, summary, "recipes", _curve)
    sweep.scaling = _entries(sweep, summary, "scaling", _scaling)
    counts = summary.get("runs")
    now = Counter(str(r["status"]) for r in sweep.rows)
    if isinstance(counts, dict) and counts != dict(now):
        listed = ", ".join(f"{n} {status}" for status, n in sorted(now.items())) or "none"
        sweep.problems.append(
            f"the sweep changed after its summary was stored (its runs now: {listed}); "
            "`keel sweep` stores a new one when it finishes"
        )


def _entries(sweep: SweepData, summary: dict[str, Any], key: str, parse: Any) -> list[Any]:
    items = summary.get(key, [])
    if not isinstance(items, list):
        sweep.problems.append(f"the stored summary's {key!r} is {type(items).__name__}, not a list; left out")
        return []
    out, bad = [], []
    for item in items:
        try:
            out.append(parse(_Fields(item)))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        sweep.problems.append(
            f"the stored summary's {key!r}: {len(bad)} entr(ies) of the wrong type left out (first: {bad[0]})"
        )
    return out


def _curve(f: _Fields) -> Curve:
    lrs, losses = f.numbers("lrs"), f.numbers("losses")
    logits = f.numbers("max_attn_logit", missing=True)
    lr_range = f.numbers("lr_range")
    if not (len(lrs) == len(losses) == len(logits) > 0) or len(lr_range) != 2:
        raise ValueError("lrs, losses, max_attn_logit and lr_range are empty or have mismatched lengths")
    return Curve(
        recipe=f.text("name"),
        size=f.text("size"),
        n_params=f.integer("n_params"),
        lr_sensitivity=f.number("lr_sensitivity"),
        vs_baseline=f.number("sensitivity_vs_baseline", missing=True),
        best_lr=f.number("best_lr"),
        best_loss=f.number("best_loss"),
        init_loss=f.number("init_loss"),
        lr_range=(lr_range[0], lr_range[1]),
        lrs=lrs,
        losses=losses,  # type: ignore[arg-type]
        max_attn_logit=logits,
        # absent or null: a summary stored before the sweep carried the router, or a dense model's
        router_z=f.numbers_per_lr("router_z", len(lrs)),
        load_imbalance=f.numbers_per_lr("load_imbalance", len(lrs)),
        dead_experts=f.numbers_per_lr("dead_experts", len(lrs)),
        diverged=f.integer("diverged"),
        errors=f.integer("errors"),
    )


def _scaling(f: _Fields) -> Scaling:
    sizes, n_params = f.texts("sizes"), f.integers("n_params")
    logits, grads = f.numbers("max_attn_logit", missing=True), f.numbers("grad_norm", missing=True)
    if not (len(sizes) == len(n_params) == len(logits) == len(grads)):
        raise ValueError("sizes, n_params, max_attn_logit and grad_norm have mismatched lengths")
    return Scaling(
        recipe=f.text("recipe"),
        lr=f.number("lr"),
        sizes=sizes,
        n_params=n_params,
        max_attn_logit=logits,
        grad_norm=grads,
        logit_fit=f.fit("logit_exponent", "logit_log10_prefactor"),
        grad_norm_fit=f.fit("grad_norm_exponent", "grad_norm_log10_prefactor"),
        divergence_logit=f.number("divergence_logit", missing=True),
        predicted_divergence_params=f.number("predicted_divergence_params", missing=True),
        reach=f.text("reach", default=""),
    )


class _Fields:
    """The fields of one JSON object read from a store, each checked for its type (ValueError names the field).

    Numbers must be finite; a field read with ``missing=True`` may be null (or absent, or non-finite) and then
    reads as None.
    """

    def __init__(self, item: Any) -> None:
        if not isinstance(item, dict):
            raise ValueError(f"an entry is {type(item).__name__}, not an object")
        self.item = item

    def text(self, name: str, default: str | None = None) -> str:
        value = self.item.get(name, default)
        if not isinstance(value, str):
            raise ValueError(f"{name} is {type(value).__name__}; allowed: text")
        return value

    def integer(self, name: str) -> int:
        return self._integer(name, self.item.get(name))

    def number(self, name: str, *, missing: bool = False) -> Any:
        return self._number(name, self.item.get(name), missing)

    def texts(self, name: str) -> tuple[str, ...]:
        return tuple(self._checked(name, lambda v: v if isinstance(v, str) else None, "text"))

    def integers(self, name: str) -> tuple[int, ...]:
        return tuple(self._integer(name, v) for v in self._list(name))

    def numbers(self, name: str, *, missing: bool = False) -> tuple[Any, ...]:
        return tuple(self._number(name, v, missing) for v in self._list(name))

    def numbers_per_lr(self, name: str, length: int) -> tuple[float | None, ...]:
        """An optional list of ``length`` numbers or nulls; absent or null reads as ``length`` Nones."""
        if self.item.get(name) is None:
            return (None,) * length
        values = self.numbers(name, missing=True)
        if len(values) != length:
            raise ValueError(f"{name} has {len(values)} values and lrs {length}: mismatched lengths")
        return values

    def fit(self, exponent: str, prefactor: str) -> tuple[float, float] | None:
        b, a = self.number(exponent, missing=True), self.number(prefactor, missing=True)
        return None if b is None or a is None else (b, a)

    def _list(self, name: str) -> list[Any]:
        value = self.item.get(name)
        if not isinstance(value, list):
            raise ValueError(f"{name} is {type(value).__name__}; allowed: a list")
        return value

    def _checked(self, name: str, check: Any, allowed: str) -> list[Any]:
        out = [check(v) for v in self._list(name)]
        if any(v is None for v in out):
            raise ValueError(f"{name} holds a value that is not {allowed}")
        return out

    @staticmethod
    def _integer(name: str, value: Any) -> int:
        if type(value) is not int:
            raise ValueError(f"{name} is {type(value).__name__}; allowed: an integer")
        return value

    @staticmethod
    def _number(name: str, value: Any, missing: bool) -> float | None:
        if type(value) in (int, float) and math.isfinite(value):
            return float(value)
        if missing and (value is None or type(value) is float):
            return None
        raise ValueError(f"{name} is {value!r:.40}; allowed: a finite number")
