"""The folders a report command makes beside its target while it works (a staging folder, and a
folder holding the old report during a swap), and how a later run knows one of them for a killed
run's: by a marker inside (``STAGING_MARKER``) naming the folder, the run's process id, its
machine and PID namespace, never by the folder's name alone, and never through a link. A process
id means something only on its machine and in its PID namespace: another container's or
another host's run sharing the folder is never taken for a killed one."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import uuid
from pathlib import Path

# Inside each staging folder (and each folder holding an old report during a swap) while it
# exists: what recognises it as this program's, by more than its name (``staging_owner``).
STAGING_MARKER = ".cost_fast_staging"
STAGING_TEXT = "A cost-fast run's staging folder; the next run to this target removes it once that run is gone.\n"


def real_dir(path: Path) -> bool:
    """A real folder (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def regular_file(path: Path) -> bool:
    """A regular file (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _here() -> str:
    """This machine and PID namespace: a process id means something only within them."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()} {namespace}"


def make_staging(parent: Path, prefix: str, pid: int | None = None) -> Path:
    """A new folder of a run's beside the target (``mkdtemp``, named ``{prefix}{random}``), with
    ``STAGING_MARKER`` naming it, the run's process id (default: this process), machine and PID
    namespace, and a random token."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    pid = os.getpid() if pid is None else pid
    (folder / STAGING_MARKER).write_text(
        f"{STAGING_TEXT}{folder.name}\n{pid}\n{_here()}\n{uuid.uuid4().hex}\n", encoding="utf-8"
    )
    return folder


def staging_owner(folder: Path) -> int | None:
    """The process id of the run whose staging folder ``folder`` is, when it is one of this
    program's by more than its name (a real folder, not a link, holding a regular
    ``STAGING_MARKER`` written for this very folder on this machine and in this PID namespace);
    else None (a user's folder, a link, another machine's or container's run: never touched)."""
    if not (real_dir(folder) and regular_file(folder / STAGING_MARKER)):
        return None
    try:
        lines = (folder / STAGING_MARKER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) != 5 or lines[0] + "\n" != STAGING_TEXT or lines[1] != folder.name or lines[3] != _here():
        return None
    return int(lines[2]) if lines[2].isdigit() else None


def killed(folder: Path, prefix: str) -> int | None:
    """The process id of a killed run whose folder ``folder`` is (named ``{prefix}{pid}.…``, its
    marker saying so, that process gone), else None."""
    if not folder.name.startswith(prefix):
        return None
    pid = staging_owner(folder)
    if pid is None or not folder.name[len(prefix) :].startswith(f"{pid}.") or _alive(pid):
        return None
    return pid
