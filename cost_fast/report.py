"""Writing a report folder all at once: a user never finds it half written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_writable_parent(target: str | os.PathLike) -> Path:
    """Raise ``ValueError`` unless ``target``'s parent is a writable directory; returns Path(target)."""
    path = Path(target)
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write the report folder {path}: {parent} is not a writable directory")
    return path


@contextlib.contextmanager
def atomic_report_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` (an existing
    folder there is removed), on any error it is deleted and ``target`` is left as it was."""
    path = check_writable_parent(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.resolve().parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp creates it private
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
