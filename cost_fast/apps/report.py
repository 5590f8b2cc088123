"""Report folders that never cost a user a file: written all at once, replacing only our own.

A report command (demo, toy, profile, reproduce) writes its folder under a temporary name beside
the target and renames it into place only when it is complete, so nobody finds it half written.
Every report carries a marker file (``MARKER``) with a report id and the list of the files the
report wrote (its manifest). An existing target is replaced only when it is an empty folder or a
report of ours that holds nothing but the files its manifest lists, only after the new one is
complete, and then only those files are deleted. Anything else there (a file, a folder with the
user's files, a report beside which the user put a file, a symbolic link, a mount point, the
current folder or one above it, a disk without room for a report) is refused by
``check_report_target`` before any work starts, and checked again at the swap.

Runs that meet at the same target: the first ``check_report_target`` of a run notes which report
(by id) was there; at the swap, under a lock on the parent folder, a run whose target changed
meanwhile (another run finished first, someone put files there) keeps its own report under a
free name beside it and says so. The swap is two renames (the old report out of the way, the new
one in); a run killed between them leaves its staging folders named with its process id, and the
next run to that target finishes the swap (or puts the old report back when the new one is
incomplete) and removes what killed runs left. Nothing else is deleted.

``mark(folder, written)`` is for outputs that add files to a folder of ours rather than replace
it (``cost-fast bench``): it adds the names to the folder's manifest.
A staging folder is removed on any error, SIGTERM included (the CLI turns it into an exit).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from cost_fast.apps.staging import STAGING_MARKER, killed, make_staging, real_dir, regular_file

MARKER = ".cost_fast_report"
MARKER_TEXT = "Written by cost-fast; the next report to this folder replaces only the files listed below.\n"
# Room a report needs (plots and JSON: a few MB at most), checked before any work.
REPORT_BYTES = 64 * 2**20
# What each run's first check saw at its target: {resolved target: report id, or None}.
_SEEN_AT_START: dict[Path, str | None] = {}


def is_our_report(path: Path) -> bool:
    """True for a folder that a cost-fast report command wrote: a real folder (not a link)
    holding ``MARKER`` as a regular file, in the current format (its text, an id, a manifest)."""
    return real_dir(path) and regular_file(path / MARKER) and _marker_lines(path)[:1] == [MARKER_TEXT.rstrip("\n")]


def _marker_lines(path: Path) -> list[str]:
    try:
        return (path / MARKER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def report_id(path: Path) -> str | None:
    """The id of the report of ours at ``path``, or None when there is none."""
    if not is_our_report(path):
        return None
    lines = _marker_lines(path)
    return lines[1] if len(lines) > 1 and lines[1].startswith("id ") else None


def manifest(path: Path) -> list[str]:
    """The files the report of ours at ``path`` lists (relative paths), as its marker says;
    untrusted input, read through ``_listed_file`` before anything is deleted."""
    return [line for line in _marker_lines(path)[2:] if line.strip()]


def _listed_file(report: Path, name: str) -> Path | None:
    """The file a manifest entry names, if it is one this program may delete: a relative path of
    plain names inside ``report`` (no absolute path, no ``..``), every folder on the way a real
    folder (no link followed) and the file itself a regular file (a link is not followed); else
    None."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(part in ("", ".", "..") or "\x00" in part for part in parts):
        return None
    here = report
    for part in parts[:-1]:
        here = here / part
        if not real_dir(here):
            return None
    target = here / parts[-1]
    return target if regular_file(target) else None


def foreign_files(path: Path) -> list[str]:
    """What the report of ours at ``path`` holds that its manifest does not list."""
    listed_set = set(manifest(path))
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in filenames + links:
            relative = str((Path(dirpath) / name).relative_to(path))
            if relative not in (MARKER, STAGING_MARKER) and relative not in listed_set:
                found.append(relative)
    return sorted(found)


def _refuse_foreign(path: Path) -> None:
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"{path} is an earlier report beside which files were put that cost-fast did not write ({shown}); "
            "they are never deleted: move them, or give another folder"
        )


def check_report_target(target: str | os.PathLike, *, merge: bool = False) -> Path:
    """Return ``Path(target)`` if a report may be written there, else raise ``ValueError`` naming
    why. Allowed: a path that does not exist yet, in a writable existing folder; an empty folder;
    a previous report of ours holding only its own files. Refused: an empty name, the current
    folder or one above it, a file, a symbolic link, a mount point, a folder holding anything
    else, an unwritable or missing parent, a disk with less than ``REPORT_BYTES`` free. A
    killed run's unfinished swap at this target is finished first (module docstring).
    ``merge=True`` for outputs that add files to a folder of ours and delete nothing (``add_files``):
    files of someone else's beside them are then no reason to refuse."""
    text = os.fspath(target)
    if not text.strip():
        raise ValueError("the report folder name is empty")
    try:
        return _check_target(text, merge)
    except OSError as err:  # a name too long, a folder that cannot be read: one line, not the errno
        shown = text if len(text) <= 80 else f"{text[:40]}...{text[-20:]} ({len(text)} characters)"
        raise ValueError(f"cannot use {shown} as the report folder: {err.strerror or err}") from None


def _check_target(text: str, merge: bool) -> Path:
    path = Path(text)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{text!r} is the current folder or one above it: give a new folder for the report")
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link: give a real folder for the report")
    parent = resolved.parent
    if parent.is_dir():
        with _locked(parent):
            recover(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder: give a new folder for the report")
        if os.path.ismount(path):
            raise ValueError(f"{path} is a mount point: give a new folder inside it")
        if not is_our_report(path) and any(path.iterdir()):
            raise ValueError(
                f"{path} is a folder with files that cost-fast did not write; it is never overwritten: "
                "give a new or empty folder"
            )
        if is_our_report(path) and not merge:
            _refuse_foreign(path)
    if not parent.is_dir():
        raise ValueError(f"cannot write the report folder {path}: {parent} is not a folder")
    try:  # the real test of writability (os.access says yes to root on read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.check.", dir=parent))
    except OSError as err:
        raise ValueError(f"cannot write the report folder {path}: {parent} is not writable ({err.strerror})") from None
    free = shutil.disk_usage(parent).free
    if free < REPORT_BYTES:
        raise ValueError(
            f"cannot write the report folder {path}: {free / 2**20:.1f} MB free on its disk, "
            f"a report needs up to {REPORT_BYTES / 2**20:.0f} MB"
        )
    _SEEN_AT_START.setdefault(resolved, report_id(path))
    return path


@contextlib.contextmanager
def atomic_report_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside ``target`` (checked by ``check_report_target``); when the
    block succeeds it becomes ``target``, replacing an empty folder or the report of ours that
    was there when this run first checked the target, only now that the new one is complete. On
    any error the staging folder is removed and ``target`` is left as it was. If the target
    changed in the meantime (another run finished first, someone put files there), nothing of it
    is touched: this run's report is kept under a free name, said in the error."""
    path = check_report_target(target)
    parent = path.resolve().parent
    seen = _SEEN_AT_START.pop(path.resolve(), None)
    staging = make_staging(parent, f".{path.name}.{os.getpid()}.")
    try:
        yield staging
        written = sorted(
            str(p.relative_to(staging))
            for p in staging.rglob("*")
            if (p.is_file() or p.is_symlink()) and p != staging / STAGING_MARKER
        )
        _write_marker(staging, f"id {uuid.uuid4().hex}", written)
        staging.chmod(0o755)  # mkdtemp creates it private
        with _locked(parent):
            _move_into_place(staging, path, seen)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def mark(folder: Path, written: Iterable[str]) -> None:
    """Add ``written`` (names relative to ``folder``) to the manifest of the folder of ours
    (a new marker where there is none)."""
    listed = manifest(folder) if is_our_report(folder) else []
    _write_marker(folder, f"id {uuid.uuid4().hex}", sorted(set(listed) | set(written)))


def add_files(staging: Path, folder: Path, names: list[str]) -> None:
    """Move the files ``names`` from ``staging`` into ``folder`` (new, empty or ours) and add them
    to its manifest, the parent folder locked. Checked again now, not only at the start: if the
    folder has become someone else's, or one of the names is a file there that the manifest does
    not list, nothing is moved and the files are kept in a free name beside it, said in the
    error."""
    with _locked(folder.resolve().parent):
        if folder.exists() or folder.is_symlink():
            if folder.is_symlink() or not folder.is_dir():
                raise _kept_elsewhere(staging, folder)
            if not is_our_report(folder) and any(folder.iterdir()):
                raise _kept_elsewhere(staging, folder)
            listed = manifest(folder) if is_our_report(folder) else []
            if any((folder / n).exists() and n not in listed for n in names):
                raise _kept_elsewhere(staging, folder)
        folder.mkdir(exist_ok=True)
        for name in names:
            os.replace(staging / name, folder / name)
        mark(folder, names)


def _write_marker(folder: Path, ident: str, written: list[str]) -> None:
    (folder / MARKER).write_text(
        MARKER_TEXT + ident + "\n" + "".join(f"{name}\n" for name in written), encoding="utf-8"
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself: no lock file is left), or
    none where the file system refuses one."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def begin_run() -> None:
    """Forget what earlier runs of this process saw at their targets (a command starts)."""
    _SEEN_AT_START.clear()


def recover(path: Path) -> None:
    """Finish or revert the swap that a killed run left at ``path``, and remove the staging
    folders of killed runs there (call with the parent folder locked). Only folders this program
    made, recognised by their marker (``staging_owner``), are ever touched."""
    parent = path.resolve().parent
    staging_prefix, old_prefix = f".{path.name}.", f".{path.name}.old."
    entries = list(parent.iterdir())
    for old in entries:
        pid = killed(old, old_prefix)
        if pid is None:
            continue
        report = old / "report"
        if is_our_report(report) and not (path.exists() or path.is_symlink()):
            finished = [
                s
                for s in entries
                if not s.name.startswith(old_prefix) and killed(s, staging_prefix) == pid and is_our_report(s)
            ]
            if finished:  # the new report was complete: finish the swap
                (finished[0] / STAGING_MARKER).unlink()
                os.rename(finished[0], path)
            else:  # put the old report back
                os.rename(report, path)
        if is_our_report(report):
            _delete_report(report)
        (old / STAGING_MARKER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            old.rmdir()
    for staging in parent.iterdir():
        if not staging.name.startswith(old_prefix) and killed(staging, staging_prefix) is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if real_dir(path):  # a swap killed right after the rename: the new report's staging marker
        (path / STAGING_MARKER).unlink(missing_ok=True)


def _move_into_place(staging: Path, path: Path, seen: str | None) -> None:
    """Swap ``staging`` in at ``path`` (the parent folder locked); keep it elsewhere if ``path``
    is no longer what this run saw at its start, or holds anything not ours."""
    old = None
    if path.exists() or path.is_symlink():
        ours = is_our_report(path)
        if ours and report_id(path) == seen and not foreign_files(path):
            old = make_staging(staging.parent, f".{path.name}.old.{os.getpid()}.")
            os.replace(path, old / "report")  # out of the way; its files deleted once the new one is in
        elif not ours and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
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
    (path / STAGING_MARKER).unlink()
    if old is not None:
        _delete_report(old / "report")
        (old / STAGING_MARKER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: a file of someone else's appeared, kept there
            old.rmdir()


def _delete_report(path: Path) -> None:
    """Delete the files a report of ours lists (each read through ``_listed_file``: never outside
    it, never through a link) and its marker, then its folders where empty; anything else stays."""
    for name in manifest(path):
        listed = _listed_file(path, name)
        if listed is not None:
            listed.unlink()
    for marker in (MARKER, STAGING_MARKER):
        if regular_file(path / marker):
            (path / marker).unlink()
    for folder in sorted((p for p in path.rglob("*") if real_dir(p)), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _free_name(path: Path) -> Path:
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise ValueError(f"no free name beside {path}")


def _kept_elsewhere(staging: Path, path: Path) -> ValueError:
    kept = _free_name(path)
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    os.rename(staging, kept)
    return ValueError(
        f"{path} was written or changed by someone else while this run worked (another run to the same "
        f"folder?); it was left as it is and this run's report is in {kept}"
    )
