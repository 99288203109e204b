"""Text from outside (a log, a store, a user's argument), made safe to print: it is data, not terminal control.

A log can hold anything in a column name, a tag, a stored cause: ANSI escape sequences that clear the screen
or rewrite the window title, a carriage return that overwrites the line, a bidirectional override that shows
text backwards, a line break that forges a line of the report. Every such character is shown escaped, as
Python writes it in a string literal (``\\x1b``, ``\\r``, ``\\u202e``); everything printable stays as it is.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 16


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped.

    Example:
        >>> printable("loss\\x1b[31m"), printable("grad norm"), printable("a\\nb")
        ('loss\\\\x1b[31m', 'grad norm', 'a\\\\nb')
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one printable line: line breaks and tabs become spaces, other control characters are escaped
    (`printable`), and with ``limit`` a longer line is cut, at a word's end where one is near, ending in "…".

    Example:
        >>> one_line("no such file:\\n  x\\x1b[2J"), one_line("abcdef", limit=4)
        ('no such file:   x\\\\x1b[2J', 'abc…')
        >>> one_line("lower the LR and add QK-norm", limit=24)
        'lower the LR and add…'
    """
    line = printable(text.translate(_BREAKS)).strip()
    if limit is None or len(line) <= limit:
        return line
    cut = line[: limit - 1]
    space = cut.rfind(" ")
    if space >= 0.6 * limit:  # at a word's end, not in a word ("add QK-…")
        cut = cut[:space].rstrip(" ,;:(—")
    return cut + "…"


_BREAKS = str.maketrans(dict.fromkeys("\n\r\t\v\f", " "))


def printable_tree(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every string in it (dict keys too, through lists and tuples) made `printable`.

    Below ``MAX_DEPTH`` levels a container becomes ``"…"``: nothing printed goes that deep, and a crafted
    store's evidence may nest a thousand levels.
    """
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, (dict, list, tuple)) and depth >= MAX_DEPTH:
        return "…"
    if isinstance(obj, dict):
        return {printable_tree(k, depth + 1): printable_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [printable_tree(v, depth + 1) for v in obj]
    return obj
