"""File modes of what the tools write: as the process's umask says, like any other file.

Some writers do not follow the umask: ``tempfile.mkdtemp`` makes ``0700`` directories and
safetensors writes ``0600`` files. :func:`follow_umask` gives such a path the mode a plain
``open``/``mkdir`` would have given it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting and restoring it; serialised between threads)."""
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Set ``path``'s mode to ``0o666 & ~umask`` (a file) or ``0o777 & ~umask`` (a directory)."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    path.chmod(base & ~current_umask())
