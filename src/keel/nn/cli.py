"""`keel list`: every stabilizer `keel.stabilize` can apply, with a one-line description and its reference."""

from __future__ import annotations

import argparse
import json

from keel.nn.stabilize import DEFAULT_STABILIZERS, list_stabilizers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"stabilizers": [{"name", "description", "reference", "default"}]} as JSON',
    )


def main(args: argparse.Namespace) -> int:
    rows = list_stabilizers()
    if args.json:
        print(
            json.dumps(
                {
                    "stabilizers": [
                        {
                            "name": name,
                            "description": description,
                            "reference": reference,
                            "default": name in DEFAULT_STABILIZERS,
                        }
                        for name, description, reference in rows
                    ]
                },
                indent=2,
            )
        )
        return 0
    print(format_stabilizers(rows))
    return 0


def format_stabilizers(rows: list[tuple[str, str, str]]) -> str:
    """The table `keel list` prints: name, description, and the reference on an indented line below."""
    name_width = max((len(name) for name, _, _ in rows), default=4) + 2
    lines = ["stabilizers for keel.stabilize(model, [...], optimizer=opt)  (* = applied by default)", ""]
    for name, description, reference in rows:
        mark = "*" if name in DEFAULT_STABILIZERS else " "
        lines.append(f"{mark} {name:<{name_width}}{description}")
        lines.append(" " * (name_width + 2) + reference)
    lines += [
        "",
        "Optimizers (keel.optim.list_optimizers) and losses (keel.losses) are used directly; see their docstrings.",
    ]
    return "\n".join(lines)
