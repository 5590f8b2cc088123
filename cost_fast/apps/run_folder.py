"""The folder of a ``cost-fast train`` run: claimed before the run writes anything, written file
by file as the run goes, never holding a file of the user's that the run would overwrite.

A new run needs a folder that does not exist yet (it is created) or is empty; ``check`` refuses
anything else before any work starts: a file, a symbolic link, a folder with files in it (a
run's folder is continued with ``--resume``, never restarted over). ``--resume`` needs a run's
folder: one whose marker (``MARKER``, a JSON file) says so. The marker lists every file the
run wrote; each is written under a temporary name beside it and renamed into place, so a
killed run leaves every file whole (the last checkpoint included). A lock on the folder keeps a
second run out of a folder in use. Files the user adds to a run's folder are left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from cost_fast.atomic import replace_bytes

MARKER = ".cost_fast_run"
FORMAT = "cost-fast train run 1"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's contents, or None where there is no marker of ours (none, a link, another
    format, unreadable)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        contents = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        return None
    return contents


def check(target: str | os.PathLike, *, resume: bool) -> dict[str, Any] | None:
    """Check that ``target`` can hold a new run (``resume=False``) or holds one to continue
    (module docstring), writing nothing; returns the run's marker when resuming.

    Raises:
        ValueError: one line saying why not.
    """
    path = Path(target)
    if path.is_symlink():
        raise ValueError(f"--out {path}: is a symbolic link; give the folder itself")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file, not a folder")
    marker = _read_marker(path) if path.is_dir() else None
    if resume:
        if marker is None:
            raise ValueError(f"--resume: {path} holds no run of cost-fast train to continue")
        return marker
    if marker is not None:
        raise ValueError(
            f"--out {path}: holds a run of cost-fast train ({marker.get('epochs_done', 0)} epochs done): "
            "--resume continues it, another --out starts a new run"
        )
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"--out {path}: holds files cost-fast train did not write; give a new or empty folder")
    if not path.exists():
        parent = next(p for p in path.absolute().parents if p.exists())
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--out {path}: cannot create it ({parent} is not writable)")
    return None


class RunFolder:
    """A claimed run folder (module docstring); ``close()`` releases it.

    Args:
        target: the folder, checked by ``check`` with the same ``resume``.
        resume: whether the run continues.
        experiment: the experiment's name, kept in the marker.
    """

    def __init__(self, target: str | os.PathLike, *, resume: bool, experiment: str) -> None:
        marker = check(target, resume=resume)
        self.path = Path(target)
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker = marker or {"format": FORMAT, "experiment": experiment, "epochs_done": 0, "written": []}
        if self.marker.get("experiment") != experiment:
            raise ValueError(
                f"--resume: {self.path} holds a {self.marker.get('experiment')} run, not a {experiment} one"
            )
        # the lock is on the folder itself: the marker is replaced (renamed over) as the run goes
        self._lock: int | None = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ValueError(f"--out {self.path}: another cost-fast train is writing to it") from None
        self._write_marker()

    def _write_marker(self) -> None:
        self._replace(MARKER, json.dumps(self.marker, indent=1).encode())

    def _replace(self, name: str, data: bytes) -> None:
        replace_bytes(self.path / name, data)

    def _claim(self, name: str) -> Path:
        """The path of our file ``name``, listed in the marker first."""
        target = self.path / name
        if name not in self.marker["written"]:
            if target.exists() or target.is_symlink():
                raise ValueError(f"{target}: exists and was not written by this run; it is left alone")
            self.marker["written"].append(name)
            self._write_marker()
        return target

    def write(self, name: str, data: str | bytes) -> Path:
        """Write ``data`` to the run's file ``name`` (whole, or the earlier one is kept)."""
        target = self._claim(name)
        self._replace(name, data.encode() if isinstance(data, str) else data)
        return target

    def file(self, name: str) -> Path:
        """The path of the run's file ``name``, for a writer that replaces it whole itself
        (``cost_fast.checkpoint.save``)."""
        return self._claim(name)

    def epochs_done(self, epochs: int) -> None:
        """Note in the marker how far the run got."""
        self.marker["epochs_done"] = epochs
        self._write_marker()

    def close(self) -> None:
        """Release the folder (its lock)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
