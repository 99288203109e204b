"""Run labels: each run named by the shortest end of its path that no other run's path ends with.

Runs are often kept in folders of the same name (``A/keel``, ``B/keel``): their folder names alone would
label both "keel". The label grows from the end of the path until it is unique — ``A/keel`` and ``B/keel``;
a single run keeps its folder's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath


def run_labels(paths: Sequence[PurePath]) -> list[str]:
    """The label of each path: its shortest end (last k parts) that ends no other path.

    A path every end of which also ends another path (``keel`` beside ``A/keel``) is labelled whole. Distinct
    paths get distinct labels: two equal labels of k parts would each end both paths, so each is its whole path,
    and the paths would be equal. Give absolute paths to label by where the runs are, not how they were typed.

    Args:
        paths: The runs' folders.

    Returns:
        One label per path, in order.

    Example:
        >>> from pathlib import PurePosixPath as P
        >>> run_labels([P("/w/A/keel"), P("/w/B/keel"), P("/w/B/other")])
        ['A/keel', 'B/keel', 'other']
    """
    parts = [p.parts for p in paths]
    labels = []
    for i, (path, own) in enumerate(zip(paths, parts, strict=True)):
        k = next(
            (
                k
                for k in range(1, len(own))
                if not any(j != i and other[-k:] == own[-k:] for j, other in enumerate(parts))
            ),
            len(own),
        )
        labels.append(str(type(path)(*own[len(own) - k :])))
    return labels
