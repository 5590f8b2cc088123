"""The caller's random streams: what COST does in the middle of training never moves them.

torch's global generators (the CPU one and one per CUDA device) belong to the training script:
its shuffling, dropout and augmentation draw from them, and so do the generators it gave its own
objects (``DataLoader(generator=g)``, a sampler's). Work that COST adds to a run (a teleport,
which iterates the teleport data and so a shuffled ``DataLoader``'s sampler; peft's layer
initialization; a check of ``loss_fn``) runs inside ``caller_generators_untouched``, so a run
with COST sees the same random streams as one without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def caller_generators_untouched(module: nn.Module, generators: Sequence[torch.Generator] = ()) -> Iterator[None]:
    """Run a block that may draw from torch's global generators, and from ``generators`` (the
    caller's own, e.g. a DataLoader's), without moving them: the CPU generator, those of the CUDA
    devices ``module``'s parameters live on and each of ``generators`` are saved before the block
    and restored after it (also on error)."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
