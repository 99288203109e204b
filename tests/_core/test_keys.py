"""Signal keys are declared once, in keel/_core/keys.py: no module outside _core spells one as a string literal."""

from __future__ import annotations

from pathlib import Path

import pytest

import keel
from keel._core import keys
from tests._core.source_literals import string_literals

SRC = Path(keel.__file__).parent
KEYS: dict[str, str] = {name: value for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}
# "loss" and "lr" are keys and also everyday words: a probe's registry name, an optimizer param-group field, a model
# output's attribute, a log column. A literal of them says nothing about whether the key was retyped.
ORDINARY_WORDS = frozenset({keys.LOSS, keys.LR})
# Packages still to move onto keys.py (issue 15, item 4: their owners are reworking them); empty it once they have.
NOT_YET: tuple[str, ...] = ()


def key_literals(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, key) for every string literal (f-string pieces included, docstrings not) that spells a key."""
    spelled = set(KEYS.values()) - ORDINARY_WORDS
    return [(line, value) for line, value in string_literals(source, filename) if value in spelled]


def test_no_module_outside_core_retypes_a_signal_key() -> None:
    retyped = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("_core", *NOT_YET):
            continue
        retyped += [f"{rel}:{line} {value!r}" for line, value in key_literals(path.read_text(), str(path))]
    assert retyped == [], "import the key from keel._core.keys instead"


def test_the_walker_sees_literals_and_f_string_pieces_but_not_docstrings() -> None:
    source = '"""Emits attn/max_logit."""\nA = "attn/max_logit"\nB = f"attn/max_logit/{name}"\nC = "loss"\n'
    assert key_literals(source) == [(2, "attn/max_logit"), (3, "attn/max_logit/")]


def test_every_key_is_declared_once_and_families_end_with_a_slash() -> None:
    by_value: dict[str, list[str]] = {}
    for name, value in KEYS.items():
        by_value.setdefault(value, []).append(name)
    assert {v: n for v, n in by_value.items() if len(n) > 1} == {}
    families = {name: value for name, value in KEYS.items() if value.endswith("/")}
    assert all(
        name.endswith(
            (
                "_PER_PARAM",
                "_PER_LAYER",
                "_PER_BLOCK",
                "_PER_HEAD",
                "_PER_RANK",
                "_PER_MEMBER",
                "_PER_SOURCE",
                "_PER_NAME",
                "_PER_WINDOW",
                "_PER_EVAL",
                "_PER_MODULE",
            )
        )
        for name in families
    ), families


@pytest.mark.parametrize("family", ["grad/norm", "", 3])
def test_per_param_rejects_a_key_that_is_no_family(family: object) -> None:
    with pytest.raises((ValueError, TypeError), match="family"):
        keys.per_param(family, "fc.weight")  # type: ignore[arg-type]
