"""Synthetic data of the real shapes, for smoke runs and benchmarks (``cost-fast train --synthetic``).

Each sample is drawn from a generator seeded by (seed, index), so a data set of any size costs
no memory and every run sees the same samples. The targets are functions of the image, so a
model can learn them and the task gradients conflict as on real data:

- dense (CityScapes, NYUv2 shapes): a smooth random image; labels from thresholding a smoothed
  channel (some pixels -1, unlabelled), depth from another (a few pixels 0, missing), unit
  normals from the smoothed image's gradients.
- CelebA (3x64x64, 40 attributes): a random image; attribute k is whether the image's
  projection on a fixed random direction u_k (drawn from the data set's seed) is positive.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from cost_fast.experiments.celeba_data import IMAGE_SIZE, NUM_ATTRIBUTES
from cost_fast.experiments.dense_data import DenseLayout


def _generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SyntheticDense(Dataset):
    """``num_samples`` samples shaped as ``layout``'s (module docstring), as ``DenseDataset``
    returns them."""

    def __init__(self, layout: DenseLayout, num_samples: int, seed: int = 0) -> None:
        self.layout, self.num_samples, self.seed = layout, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gen = _generator(self.seed, index)
        h, w = self.layout.size
        coarse = torch.rand(1, 3, h // 8, w // 8, generator=gen)
        image = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        image = (image + 0.05 * torch.randn(3, h, w, generator=gen)).clamp(0, 1)
        targets = []
        for task in self.layout.tasks:
            if task.kind == "segmentation":
                labels = (image[0] * task.classes).long().clamp(0, task.classes - 1)
                labels[torch.rand(h, w, generator=gen) < 0.05] = -1
                targets.append(labels)
            elif task.kind == "depth":
                depth = 0.5 + image[1:2] * 2
                depth[torch.rand(1, h, w, generator=gen) < 0.05] = 0
                targets.append(depth)
            else:
                gray = image.mean(0)
                dy, dx = torch.gradient(gray)
                targets.append(F.normalize(torch.stack([-dx * 8, -dy * 8, torch.ones_like(gray)]), dim=0))
        return image, targets


class SyntheticCelebA(Dataset):
    """``num_samples`` CelebA-shaped samples (module docstring), as ``CelebADataset`` returns
    them."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed = num_samples, seed
        gen = torch.Generator().manual_seed(seed)
        self.directions = torch.randn(3 * IMAGE_SIZE * IMAGE_SIZE, NUM_ATTRIBUTES, generator=gen)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=_generator(self.seed + 1, index))
        return image, ((image.flatten() - 0.5) @ self.directions > 0).float()
