"""COST's checkpoint state: the format of ``COST.state_dict``, its checksum, the check a loaded
state passes before any of it is applied, and checkpoint files.

The state (format 3) is a dict of plain values and tensors (``torch.load(weights_only=True)``
reads it): a header that says which COST wrote it, and each part's own state dict.

    format                3
    semantics, method     the semantics' name and the base method's class name
    num_tasks, num_params K (None before the first step) and P, the shared parameters' size
    clock                 ``Clock.state_dict()``: step_count, epoch, teleports_this_epoch
    tally                 ``Tally.state_dict()``: what the run has done so far (counts)
    teleporter            ``Teleporter.state_dict()``: COST's own generator (adapter factors, noise)
    base                  ``BaseStep.state_dict()``: the base method's own state dict
    htr                   ``HistoryReuse.state_dict()`` (a pending σ, the last update g'), or
                          None without HTR
    checksum              SHA-256 of everything above (``checksum``): a flipped byte, in a
                          tensor or elsewhere, is caught on load

``check_state`` validates all of it against the COST it is loaded into (the header against that
COST, each part's state by the part's own ``state_problems``, the base method's on a copy of it)
and raises one ``ValueError`` naming what differs; so a failed load changes nothing.

``save`` and ``load`` write and read a checkpoint file (any dict of state dicts, checksummed
whole) atomically, with one clear error for a file that is missing, empty, truncated, damaged
or not a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from cost_fast.atomic import replace_with

FORMAT = 3
PARTS = ("clock", "tally", "teleporter", "htr", "base")  # the order they are checked in: the base method last
HEADER = ("format", "semantics", "method", "num_tasks", "num_params")
KEYS = {*HEADER, *PARTS, "checksum"}


class Part(Protocol):
    """A part of COST with a state of its own (``Clock``, ``Teleporter``, ``BaseStep``,
    ``HistoryReuse``): its state, what in a given state does not fit it, and the load."""

    def state_dict(self) -> Any: ...

    def state_problems(self, state: Any) -> list[str]: ...

    def load_state_dict(self, state: Any) -> None: ...


def make_state(**fields: Any) -> dict[str, Any]:
    """The current format's state from its fields (every key of ``KEYS`` but ``format`` and
    ``checksum``, as the module docstring lists them), with its checksum."""
    expected = KEYS - {"format", "checksum"}
    if set(fields) != expected:
        raise TypeError(f"a COST state needs exactly the fields {sorted(expected)}, got {sorted(fields)}")
    state = {"format": FORMAT, **fields}
    state["checksum"] = checksum(state)
    return state


def check_format(state: Any) -> None:
    """``ValueError`` unless ``state`` is a whole COST state of the current format: a dict with
    exactly its keys and a checksum that matches its contents."""
    if not isinstance(state, dict):
        raise ValueError(f"a COST state is a dict (from COST.state_dict()), got {type(state).__name__}")
    version = state.get("format")
    if version != FORMAT:
        raise ValueError(f"COST state format {version!r} is not the one this version reads ({FORMAT})")
    missing, unknown = KEYS - set(state), set(state) - KEYS
    if missing or unknown:
        parts = [f"missing {sorted(missing)}"] * bool(missing) + [f"unexpected {sorted(unknown, key=repr)}"] * bool(
            unknown
        )
        raise ValueError(f"not a COST state of format {FORMAT}: {'; '.join(parts)}")
    if state["checksum"] != checksum(state):
        raise ValueError("the COST state is damaged: its checksum does not match its contents (nothing was loaded)")


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a state's contents (every key but "checksum"): values, and for tensors their
    dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed({key: value for key, value in state.items() if key != "checksum"})
    return digest.hexdigest()


FILE_FORMAT = "cost_fast checkpoint 1"  # what a checkpoint file holds: this, its contents and their checksum


def save(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` (any dict of state dicts: model, optimizer, COST, ...) to ``path``
    with a checksum of all of it, through a temporary file beside it that is renamed into place
    when complete: a kill or a full disk leaves the earlier file whole. A ``path`` that is a
    symbolic link is followed: its target is written and the link kept."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint is a dict of state dicts, got {type(checkpoint).__name__}")
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    wrapped = {"format": FILE_FORMAT, "checksum": checksum({"contents": checkpoint}), "contents": checkpoint}
    replace_with(target.resolve(), lambda temporary: torch.save(wrapped, temporary))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """What ``save`` wrote to ``path`` (``torch.load(weights_only=True)``), checked against its
    checksum, or one ``ValueError`` naming the file for one that is missing, empty, truncated,
    damaged (a changed byte anywhere in what it holds) or not a checkpoint of ``save``'s."""
    target = Path(path)
    if not target.is_file():
        raise ValueError(f"cannot load the checkpoint {target}: no such file")
    if target.stat().st_size == 0:
        raise ValueError(f"cannot load the checkpoint {target}: the file is empty")
    try:
        loaded = torch.load(target, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in any of torch.load's layers
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"cannot load the checkpoint {target}: it is truncated, damaged or not a checkpoint "
            f"({type(err).__name__}: {first_line})"
        ) from None
    if not (isinstance(loaded, dict) and set(loaded) == {"format", "checksum", "contents"}):
        raise ValueError(f"cannot load the checkpoint {target}: it was not written by cost_fast.checkpoint.save")
    if loaded["format"] != FILE_FORMAT:
        raise ValueError(f"cannot load the checkpoint {target}: its format {loaded['format']!r} is not {FILE_FORMAT!r}")
    contents = loaded["contents"]
    if not isinstance(contents, dict) or loaded["checksum"] != checksum({"contents": contents}):
        raise ValueError(f"cannot load the checkpoint {target}: it is damaged (its checksum does not match)")
    return contents


def check_state(state: dict[str, Any], *, header: dict[str, Any], parts: dict[str, Part | None]) -> None:
    """Raise ``ValueError`` naming what in ``state`` (checked by ``check_format``) does not fit
    the COST whose ``header`` (semantics, method, num_tasks, num_params: as ``make_state`` takes
    them; num_tasks None while COST does not know K) and ``parts`` (each name of ``PARTS`` to
    the part whose state it is, None for a part this COST does not have: HTR without Adam) are
    given; change nothing. Each part judges its own state."""
    problems = []
    for name in ("semantics", "method"):
        if state[name] != header[name]:
            what = "base method" if name == "method" else name
            problems.append(f"{what} {state[name]!r}, this COST {header[name]!r}")
    K = state["num_tasks"]
    if K is not None and not (isinstance(K, int) and not isinstance(K, bool) and K >= 1):
        problems.append(f"num_tasks must be an int ≥ 1 or None, got {K!r}")
    elif K is not None and header["num_tasks"] is not None and K != header["num_tasks"]:
        problems.append(f"{K} tasks, this COST {header['num_tasks']}")
    if state["num_params"] != header["num_params"]:
        problems.append(f"{state['num_params']!r} shared parameters, this backbone {header['num_params']}")
    for name in PARTS:
        part, value = parts[name], state[name]
        if part is None:
            if value is not None:
                problems.append(f"a {name} state, but this COST has none (HTR needs Adam or AdamW)")
            continue
        if name == "base" and problems:
            continue  # tried on a copy of the method only when everything else fits
        problems += part.state_problems(value)
    if problems:
        raise ValueError("cannot load this COST state: the state has " + "; ".join(problems) + " (nothing was loaded)")


def load_into(state: Any, *, header: dict[str, Any], parts: dict[str, Part | None]) -> None:
    """Check ``state`` whole (``check_format``, ``check_state``), then load each part's state
    into its part: a state that does not fit raises one ``ValueError`` and loads nothing."""
    check_format(state)
    check_state(state, header=header, parts=parts)
    for name in PARTS:
        if parts[name] is not None:
            parts[name].load_state_dict(state[name])
