"""The string literals of Python source, docstrings left out: what tests that guard "one home per name" walk."""

from __future__ import annotations

import ast


def string_literals(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, value) of every string constant in ``source`` (f-string pieces included), docstrings excepted."""
    tree = ast.parse(source, filename=filename)
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, owners)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    )
