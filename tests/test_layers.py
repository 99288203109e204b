"""The import direction of DESIGN.md's layers, enforced by walking every import in src/keel."""

from __future__ import annotations

import ast
from pathlib import Path

import keel

SRC = Path(keel.__file__).parent

# layer → the layers it may import. The package root (keel/__init__.py) re-exports _core and is open to all.
ALLOWED: dict[str, set[str]] = {
    "_core": set(),
    # signals and nn read log Z and the z-loss from losses/z_loss.py, their one home (losses imports only _core)
    "signals": {"_core", "losses"},
    "detect": {"_core"},
    "store": {"_core"},
    "nn": {"_core", "losses"},
    "losses": {"_core"},
    "data": {"_core"},
    "optim": {"_core"},
    "recover": {"_core", "signals", "detect"},
    "guard": {"_core", "signals", "detect", "recover", "store", "data"},
    "proxy": {"_core", "signals", "detect", "recover", "store", "guard", "nn", "losses", "optim"},
    "doctor": {"_core", "detect", "store"},
    # a log the report is given is read by the doctor into a run store first (keel.report.logs); the page is still
    # built from a store, and neither imports torch
    "report": {"_core", "store", "doctor"},
    "integrations": {"_core", "signals", "detect", "recover", "store", "guard"},
}
# Shells over the whole library: they may import any layer but each other (the CLI imports them all).
# `harness` is what measures keel — the scenario zoo and the `keel bench` benchmarks — not what users import.
TOP = {"harness", "demo", "cli", "catalog"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "keel" and len(parts) > 1 else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "keel"]
    return found


def test_every_module_belongs_to_a_known_layer():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        layer = rel.parts[0]
        assert layer == "__init__" or layer in ALLOWED or layer in TOP, f"{rel} is in no layer"


def test_imports_point_one_way():
    violations = []
    for path in SRC.rglob("*.py"):
        own = path.relative_to(SRC).with_suffix("").parts[0]
        if own == "__init__":
            continue
        for module in _imports(path):
            target = _layer(module)
            if target is None or target == own or target == "__version__":
                continue
            if own in TOP:
                ok = target not in TOP or own == "cli"
            else:
                ok = target in ALLOWED[own]
            if not ok:
                violations.append(f"{path.relative_to(SRC)} imports {module} ({own} → {target})")
    assert violations == []


def test_the_harness_is_apart_from_what_users_import():
    # the zoo and the benchmarks in one package of their own; keel.proxy keeps corpus, model, trainer, sweep
    harness = sorted(p.name for p in (SRC / "harness").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert harness == ["bench", "scenarios"]
    assert not (SRC / "bench").exists() and not (SRC / "proxy" / "scenarios").exists()
    importers = {
        path.relative_to(SRC).parts[0]
        for path in SRC.rglob("*.py")
        if any(_layer(m) == "harness" for m in _imports(path))
    }
    assert importers <= {"harness", "cli"}, importers


def test_the_walker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from keel.guard import Guard\nimport keel.proxy.model\n")
    assert _imports(bad) == ["keel.guard", "keel.proxy.model"]


def test_the_report_and_the_doctor_import_no_torch():
    import subprocess
    import sys

    code = "import sys, keel.report, keel.doctor.to_store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_plain_import_keel_reaches_every_subpackage_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, keel; assert 'torch' not in sys.modules; "
        "print(keel.signals.TRANSFORMER_PROBES is not None, keel.nn.QKNorm.__name__, "
        "keel.detect.default_detectors.__name__); assert 'transformers' not in sys.modules; "
        "print(keel.integrations.hf.KeelCallback.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # each was an AttributeError before: the docs write keel.<subpackage>.X 57 times
    assert out.split() == ["True", "QKNorm", "default_detectors", "KeelCallback"]
