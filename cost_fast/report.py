"""Report folders that never cost a user a file: written all at once, replacing only our own.

A report command (demo, toy, profile, reproduce) writes its folder under a temporary name beside
the target and renames it into place only when it is complete, so nobody finds it half written.
Every report carries a marker file (``MARKER``); an existing target is replaced only when it
carries that marker (a previous report of ours) or is an empty folder, and only after the new one
is complete. Anything else there (a file, a folder with the user's files, a symbolic link, the
current folder or one above it) is refused by ``check_report_target`` before any work starts.
A staging folder is removed on any error, SIGTERM included (the CLI turns it into an exit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = ".cost_fast_report"
MARKER_TEXT = "Written by cost-fast; the next report to this folder replaces it whole.\n"


def is_our_report(path: Path) -> bool:
    """True for a folder that a cost-fast report command wrote (it holds ``MARKER``)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_report_target(target: str | os.PathLike) -> Path:
    """Return ``Path(target)`` if a report may be written there, else raise ``ValueError`` naming
    why. Allowed: a path that does not exist yet, in a writable existing folder; an empty folder;
    a previous report of ours. Refused: an empty name, the current folder or one above it, a file,
    a symbolic link, a folder holding anything else, an unwritable or missing parent."""
    text = os.fspath(target)
    if not text.strip():
        raise ValueError("the report folder name is empty")
    path = Path(text)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{text!r} is the current folder or one above it: give a new folder for the report")
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link: give a real folder for the report")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder: give a new folder for the report")
        if not is_our_report(path) and any(path.iterdir()):
            raise ValueError(
                f"{path} is a folder with files that cost-fast did not write; it is never overwritten: "
                "give a new or empty folder"
            )
    parent = resolved.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write the report folder {path}: {parent} is not a folder")
    try:  # the real test of writability (os.access says yes to root on read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.check.", dir=parent))
    except OSError as err:
        raise ValueError(f"cannot write the report folder {path}: {parent} is not writable ({err.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_report_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``target`` (checked by ``check_report_target``); when the
    block succeeds it becomes ``target``, replacing a previous report of ours or an empty folder
    only now that the new one is complete. On any error the staging folder is removed and
    ``target`` is left as it was. If another run put something at ``target`` in the meantime,
    nothing of it is touched: this run's report is kept under another name, said in the error."""
    path = check_report_target(target)
    parent = path.resolve().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        yield staging
        (staging / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp creates it private
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, path: Path) -> None:
    old = None
    if path.exists() or path.is_symlink():
        if is_our_report(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=staging.parent))
            os.replace(path, old / "report")  # out of the way; deleted once the new one is in place
        elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        else:
            raise _kept_elsewhere(staging, path)
    try:
        os.rename(staging, path)
    except OSError:  # another run created it between our check and the rename
        if old is not None:
            os.rename(old / "report", _free_name(path))
            old.rmdir()
        raise _kept_elsewhere(staging, path) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _free_name(path: Path) -> Path:
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise ValueError(f"no free name beside {path}")


def _kept_elsewhere(staging: Path, path: Path) -> ValueError:
    kept = _free_name(path)
    os.rename(staging, kept)
    return ValueError(
        f"{path} was created by someone else while this run worked (another run to the same folder?); "
        f"it was left as it is and this run's report is in {kept}"
    )
