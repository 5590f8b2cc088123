"""COST's checkpoint state: what ``COST.state_dict`` holds, and the check a loaded state passes
before any of it is applied.

The state (format 2) is a dict of plain values and tensors (``torch.load(weights_only=True)``
reads it):

    format                2
    semantics, method     the semantics' name and the base method's class name
    num_tasks, num_params K (None before the first step) and P, the shared parameters' size
    step_count, epoch, teleports_this_epoch     ints ≥ 0
    generator             COST's own generator state (adapter factors, teleport noise)
    base                  the base method's own state dict
    last_update           HTR's g' (shape (P,)), or None when no base update was taken
    htr                   {"pending_sigma": σ in (0, 1] or None}, or None without HTR
    checksum              SHA-256 of everything above (``checksum``): a flipped byte, in a
                          tensor or elsewhere, is caught on load

``check_state`` validates all of it against the COST it is loaded into (types, the method, K,
P, the generator state, the base method's state, which is tried on a copy of the method) and
raises one ``ValueError`` naming what differs; so a failed load changes nothing. Format 1 (the
first release: no format, method, sizes or checksum; ``has_update`` instead) is read too.

``save`` and ``load`` write and read a checkpoint file (any dict of state dicts) atomically and
with one clear error for a file that is missing, empty, truncated or not a checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 2
COUNTERS = ("step_count", "epoch", "teleports_this_epoch")
KEYS = {
    1: {"semantics", "has_update", "generator", "base", "last_update", "htr", *COUNTERS},
    2: {
        "format",
        "semantics",
        "method",
        "num_tasks",
        "num_params",
        "generator",
        "base",
        "last_update",
        "htr",
        "checksum",
        *COUNTERS,
    },
}


def make_state(**fields: Any) -> dict[str, Any]:
    """The current format's state from its fields (every key of ``KEYS[FORMAT]`` but ``format``
    and ``checksum``, as the module docstring lists them), with its checksum."""
    expected = KEYS[FORMAT] - {"format", "checksum"}
    if set(fields) != expected:
        raise TypeError(f"a COST state needs exactly the fields {sorted(expected)}, got {sorted(fields)}")
    state = {"format": FORMAT, **fields}
    state["checksum"] = checksum(state)
    return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def upgrade(state: Any) -> dict[str, Any]:
    """The state in the current format (a format-1 state gets its missing fields from what it
    holds); ``ValueError`` if it is no COST state of a known format or its keys differ."""
    if not isinstance(state, dict):
        raise ValueError(f"a COST state is a dict (from COST.state_dict()), got {type(state).__name__}")
    version = state.get("format", 1)
    if version not in KEYS:
        raise ValueError(f"COST state format {version!r} is not one this version reads ({sorted(KEYS)})")
    missing, unknown = KEYS[version] - set(state), set(state) - KEYS[version]
    if missing or unknown:
        parts = [f"missing {sorted(missing)}"] * bool(missing) + [f"unexpected {sorted(unknown)}"] * bool(unknown)
        raise ValueError(f"not a COST state of format {version}: {'; '.join(parts)}")
    if version == FORMAT:
        if state["checksum"] != checksum(state):
            raise ValueError("the COST state is damaged: its checksum does not match its contents (nothing was loaded)")
        return state
    last = state["last_update"] if state["has_update"] is True else None  # format 1 saved it uninitialized
    return {
        "format": FORMAT,
        "semantics": state["semantics"],
        "method": None,
        "num_tasks": None,
        "num_params": None if last is None else last.numel(),
        **{name: state[name] for name in COUNTERS},
        "generator": state["generator"],
        "base": state["base"],
        "last_update": last,
        "htr": state["htr"],
    }


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a state's contents (every key but "checksum"): values, and for tensors their
    dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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


def save(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` into a temporary file beside ``path``, renamed into place when complete: a
    kill or a full disk leaves the earlier file whole."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.resolve().parent)
    os.close(handle)
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, or one ``ValueError`` naming the file for one that
    is missing, empty, truncated or not a checkpoint."""
    target = Path(path)
    if not target.is_file():
        raise ValueError(f"cannot load the checkpoint {target}: no such file")
    if target.stat().st_size == 0:
        raise ValueError(f"cannot load the checkpoint {target}: the file is empty")
    try:
        loaded = torch.load(target, weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"cannot load the checkpoint {target}: it is truncated or not a checkpoint "
            f"({type(err).__name__}: {first_line})"
        ) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"cannot load the checkpoint {target}: it holds a {type(loaded).__name__}, not a dict")
    return loaded


def check_state(
    state: dict[str, Any],
    *,
    semantics: str,
    method: Any,
    num_tasks: int | None,
    num_params: int,
    generator: torch.Generator,
    has_htr: bool,
) -> None:
    """Raise ``ValueError`` naming the first thing in ``state`` (current format) that does not
    fit the COST described by the other arguments; change nothing. ``method`` is the base method
    itself (its state is loaded into a copy of it); ``num_tasks`` is None when COST does not
    know K yet."""
    problems = []
    if state["semantics"] != semantics:
        problems.append(f"semantics {state['semantics']!r}, this COST {semantics!r}")
    name = type(method).__name__
    if state["method"] is not None and state["method"] != name:
        problems.append(f"base method {state['method']!r}, this COST {name!r}")
    for counter in COUNTERS:
        if not _is_count(state[counter]):
            problems.append(f"{counter} must be an int ≥ 0, got {state[counter]!r}")
    K = state["num_tasks"]
    if K is not None and not (_is_count(K) and K >= 1):
        problems.append(f"num_tasks must be an int ≥ 1 or None, got {K!r}")
    elif K is not None and num_tasks is not None and K != num_tasks:
        problems.append(f"{K} tasks, this COST {num_tasks}")
    if state["num_params"] is not None and state["num_params"] != num_params:
        problems.append(f"{state['num_params']} shared parameters, this backbone {num_params}")
    last = state["last_update"]
    if last is not None and not (
        isinstance(last, torch.Tensor) and last.dtype.is_floating_point and tuple(last.shape) == (num_params,)
    ):
        got = f"shape {tuple(last.shape)} {last.dtype}" if isinstance(last, torch.Tensor) else type(last).__name__
        problems.append(f"last_update must be a float tensor of shape ({num_params},), got {got}")
    problems += _generator_problems(state["generator"], generator)
    problems += _htr_problems(state["htr"], has_htr)
    if not problems:  # the base state last: it is tried on a copy of the method
        problems += _base_problems(state["base"], method)
    if problems:
        raise ValueError("cannot load this COST state: the state has " + "; ".join(problems) + " (nothing was loaded)")


def _generator_problems(value: Any, generator: torch.Generator) -> list[str]:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
        return [f"a generator state that is not a uint8 tensor ({type(value).__name__})"]
    trial = torch.Generator(device=generator.device)
    try:
        trial.set_state(value)
    except (RuntimeError, ValueError) as err:
        return [f"a generator state that a {generator.device} generator refuses ({err})"]
    return []


def _htr_problems(value: Any, has_htr: bool) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict) or set(value) != {"pending_sigma"}:
        return [f"an HTR state that is not {{'pending_sigma': ...}}: {value!r}"]
    sigma = value["pending_sigma"]
    if sigma is None:
        return []
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < sigma <= 1:
        return [f"a pending HTR σ that is not in (0, 1]: {sigma!r}"]
    if not has_htr:
        return ["a pending HTR, but this optimizer has none (HTR needs Adam or AdamW)"]
    return []


def _base_problems(value: Any, method: Any) -> list[str]:
    trial = copy.deepcopy(method)
    try:
        trial.load_state_dict(copy.deepcopy(value))
    except Exception as err:  # noqa: BLE001 - any refusal of the method's own loader is reported
        return [f"a base-method state that {type(method).__name__} refuses ({type(err).__name__}: {err})"]
    return []
