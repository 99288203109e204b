"""Run folders of the trackers that keep one folder per run (W&B's ``wandb/run-*``, MLflow's ``mlruns/<exp>/<run>``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def runs_below(folder: Path, is_run: Callable[[Path], bool], depth: int) -> list[Path]:
    """``folder`` when it is a run itself, else the run folders up to ``depth`` levels below it, in path order.

    A run folder is not searched further; hidden folders (MLflow's ``.trash``) and links to folders (W&B's
    ``latest-run``, a second name for a run listed anyway) are passed over, as is a folder that cannot be listed.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for run in ("wandb/run-a", "wandb/run-b", ".trash/run-c"):
        ...     (root / run).mkdir(parents=True)
        >>> [p.relative_to(root).as_posix() for p in runs_below(root, lambda p: p.name.startswith("run-"), 2)]
        ['wandb/run-a', 'wandb/run-b']
    """
    if is_run(folder):
        return [folder]
    found: list[Path] = []
    level = [folder]
    for _ in range(depth):
        below: list[Path] = []
        for parent in level:
            try:
                children = sorted(
                    p for p in parent.iterdir() if not p.name.startswith(".") and not p.is_symlink() and p.is_dir()
                )
            except OSError:  # no permission, vanished meanwhile: nothing found there
                continue
            for child in children:
                (found if is_run(child) else below).append(child)
        level = below
    return sorted(found)


def several_runs_error(path: Path, runs: list[Path], kind: str, reads_one: str = "") -> str:
    """The message for a folder of several runs given where one log was expected."""
    names = ", ".join(p.relative_to(path).as_posix() for p in runs[:6]) + (" …" if len(runs) > 6 else "")
    return (
        f"{path}: a folder of {len(runs)} {kind} runs ({names}); keel doctor examines each, "
        f"give one to read it{reads_one}"
    )
