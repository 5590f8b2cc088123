"""The caller's random streams: what COST does in the middle of training never moves them.

torch's global generators (the CPU one and one per CUDA device) belong to the training script:
its shuffling, dropout and augmentation draw from them. Work that COST adds to a run (a teleport,
which iterates the teleport data and so a shuffled ``DataLoader``'s sampler; peft's layer
initialization; a check of ``loss_fn``) runs inside ``caller_generators_untouched``, so a run
with COST sees the same random stream as one without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def caller_generators_untouched(module: nn.Module) -> Iterator[None]:
    """Run a block that may draw from torch's global generators without moving them: the CPU
    generator and those of the CUDA devices ``module``'s parameters live on are saved before the
    block and restored after it (also on error)."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield
