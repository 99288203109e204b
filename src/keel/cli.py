"""The `keel` command: a thin shell where each verb calls one public library function.

Each verb lives in its own module with ``add_arguments(parser)`` and ``main(args) -> int``; only the invoked
verb's module is imported, so ``keel --help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module, one-line help). A verb with sub-verbs (bench) dispatches inside its module.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("keel.demo", "train an unstable proxy recipe bare, guarded, recovering and stabilized, side by side"),
    "bench": ("keel.bench.cli", "measure keel's own cost against a baseline in the same process"),
    "doctor": ("keel.doctor.cli", "diagnose an existing training log: CSV, JSONL, TensorBoard, HF, run store"),
    "report": ("keel.report.cli", "write one self-contained HTML stability report from run stores"),
    "export": ("keel.store.exporters.cli", "write a run store as CSV, JSON lines, TensorBoard, W&B or MLflow"),
    "list": ("keel.nn.cli", "list the remedies keel.stabilize can apply, each with its reference"),
    "sweep": ("keel.proxy.sweep.cli", "LR-sensitivity sweeps of recipes on proxy models, locally or on Ray"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``verb``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="keel", description="Keep neural-network training stable.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
