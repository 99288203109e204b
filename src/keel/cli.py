"""The `keel` command: a thin shell where each verb calls one public library function.

Each verb lives in its own module with ``add_arguments(parser)`` and ``main(args) -> int``; it is imported
only when invoked, so ``keel --help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module, one-line help). A verb with sub-verbs (bench) dispatches inside its module.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("keel.demo", "train an unstable proxy recipe bare and under Guard, side by side"),
    "bench": ("keel.bench.cli", "measure keel's own cost against a baseline in the same process"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Keep neural-network training stable.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
