"""Files replaced whole: written under a temporary name beside their target and renamed into
place, so that a kill or a full disk leaves the earlier file as it was. The temporary file is
created with the permissions any new file gets (0o666 less the umask), where ``tempfile.mkstemp``
would make it private."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def temporary_beside(target: Path) -> Path:
    """A new empty file ``.{name}.{random}`` in ``target``'s folder (created exclusively)."""
    while True:
        candidate = target.parent / f".{target.name}.{secrets.token_hex(4)}"
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue


def replace_with(target: Path, write: Callable[[Path], None]) -> None:
    """Replace ``target`` by the file ``write(temporary)`` writes, flushed to disk first; on
    any error the temporary file is removed and ``target`` left as it was."""
    temporary = temporary_beside(target)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_bytes(target: Path, data: bytes) -> None:
    """Replace ``target`` by a file holding ``data`` (``replace_with``)."""
    replace_with(target, lambda path: path.write_bytes(data))
