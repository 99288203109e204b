"""A file written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (its folder created) whole or not at all: into a file beside it, flushed to the disk,
    then renamed over ``path``. A full disk or a crash leaves the file that was there as it was, never a truncated one
    (a report page, a skip list); the partial file is removed. A symlink stays a link: the file it points to gets the
    text, as a plain write gives it. The new file has the mode a plain ``open`` gives (the umask's).

    Raises:
        OSError: The text could not be written, naming ``path`` (the write's own error names no file).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "a" / "page.html"
        >>> write_whole(out, "<p>hi</p>"); out.read_text(), [p.name for p in out.parent.iterdir()]
        ('<p>hi</p>', ['page.html'])
    """
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.{os.getpid()}.partial"
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the data (a crash would leave 0 bytes)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
