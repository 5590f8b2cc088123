"""The teleport data as COST iterates it: without disturbing the caller's own iteration of it.

The public code teleports over a copy of the training loader, so the teleport data is often the
very loader the training loop is iterating. Two things of a ``torch.utils.data.DataLoader`` would
then be disturbed by COST's passes over it:

- with ``persistent_workers=True`` a loader keeps one iterator, which ``iter(loader)`` resets: a
  teleport in the middle of an epoch would end the caller's epoch early. COST iterates a loader
  of its own over the same dataset, batch sampler and worker settings instead (built at the first
  teleport; its workers persist as the caller's do);
- each pass draws from the loader's generator (``DataLoader(generator=g)``, as PyTorch
  recommends for reproducible shuffling) and its sampler's: ``generators()`` lists them, and the
  teleport runs with their states (and torch's global generators, ``cost_fast.rng``) saved and
  restored, so the caller's shuffling is the same as without COST.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset


class TeleportData:
    """COST's view of the teleport data (module docstring): re-iterable, with ``len`` where the
    data has one.

    Args:
        data: the teleport data: a DataLoader, a list of batches, any re-iterable.
    """

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self._own: DataLoader | None = None

    def __iter__(self) -> Iterator[Any]:
        data = self.data
        if isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0:
            if self._own is None:
                self._own = _twin(data)
            return iter(self._own)
        return iter(data)

    def __len__(self) -> int:
        return len(self.data)

    def generators(self) -> list[torch.Generator]:
        """The generators an iteration of the data may draw from, besides torch's global ones: a
        DataLoader's own and those of its sampler and batch sampler (each once)."""
        data = self.data
        if not isinstance(data, DataLoader):
            return []
        found: list[torch.Generator] = []
        batch_sampler = getattr(data, "batch_sampler", None)
        for owner in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
        return found


def _twin(loader: DataLoader) -> DataLoader:
    """A loader of COST's own with ``loader``'s dataset, batching and worker settings."""
    settings = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": True,
        "pin_memory_device": loader.pin_memory_device,
    }
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **settings)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **settings)
