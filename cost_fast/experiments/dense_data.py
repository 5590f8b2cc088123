"""CityScapes and NYUv2 in MTAN's preprocessed layout, checked before any work, with the
augmentation of the MTAN / Nash-MTL / COST trainers.

Layout (one ``.npy`` per sample, ``{i}`` = 0, 1, ..., N - 1, the same N in every folder of a split)::

    DIR/train/image/{i}.npy     float (H, W, 3)
    DIR/train/<label>/{i}.npy   (H, W), integer values: -1 (unlabelled) or 0 .. C-1
    DIR/train/depth/{i}.npy     float (H, W, 1), 0 where there is no depth
    DIR/train/normal/{i}.npy    float (H, W, 3), NYUv2 only; a zero vector where there is none
    DIR/val/...                 the same (the papers evaluate, and report, on val)

CityScapes: H, W = 128, 256, ``label_7`` (7 classes); NYUv2: 288, 384, ``label`` (13 classes).

``check_split`` reads every file's header (shape, dtype) and every label file whole (its values)
before training starts, and says in one line what is wrong and where; image, depth and normal
values are checked (finite) as each sample is loaded.

Augmentation (train only, ``augment=True``): a random scale s in {1, 1.2, 1.5} crops an
(H/s, W/s) window at a uniform position and resizes it back to (H, W), bilinear for the image
and normals, nearest for labels and depth, and divides the depth by s (the scene is seen s
times closer); then a horizontal flip with probability 1/2, negating the normals' x component.
Its random numbers come from a generator seeded by (seed, epoch, index), so a sample's
augmentation does not depend on the loader's workers or order, and a resumed run sees the same.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from cost_fast.experiments.dense_tasks import IGNORE_LABEL, DenseTask

SPLITS = ("train", "val")
SCALES = (1.0, 1.2, 1.5)


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """A dense data set's layout (module docstring).

    Attributes:
        name: "cityscapes" or "nyuv2". size: (H, W). tasks: its tasks, in order.
        folders: task name → the folder of its targets.
    """

    name: str
    size: tuple[int, int]
    tasks: tuple[DenseTask, ...]
    folders: dict[str, str]

    def channels(self, folder: str) -> int | None:
        """The last dimension of a file in ``folder`` (None: a (H, W) label file)."""
        if folder == "image":
            return 3
        task = next(t for t in self.tasks if self.folders[t.name] == folder)
        return None if task.kind == "segmentation" else task.channels


CITYSCAPES = DenseLayout(
    "cityscapes",
    (128, 256),
    (DenseTask("segmentation", "segmentation", 7), DenseTask("depth", "depth")),
    {"segmentation": "label_7", "depth": "depth"},
)
NYUV2 = DenseLayout(
    "nyuv2",
    (288, 384),
    (DenseTask("segmentation", "segmentation", 13), DenseTask("depth", "depth"), DenseTask("normal", "normal")),
    {"segmentation": "label", "depth": "depth", "normal": "normal"},
)


def _count(folder: Path) -> int:
    """N for a folder holding exactly 0.npy .. (N-1).npy; ValueError otherwise."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing (expected a folder of 0.npy, 1.npy, ...)")
    names = [n for n in os.listdir(folder) if n.endswith(".npy")]
    indices = sorted(int(n[:-4]) for n in names if n[:-4].isdigit())
    if not indices:
        raise ValueError(f"{folder}: no 0.npy, 1.npy, ... in it")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise ValueError(f"{folder}: {missing[0]}.npy is missing (the files must be numbered 0 .. N-1)")
    return len(indices)


def _check_header(path: Path, shape: tuple[int, ...]) -> None:
    """The file's shape is ``shape`` and its dtype a number type (its header only)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy file ({err})") from None
    if array.shape != shape:
        raise ValueError(f"{path}: shape {array.shape}, expected {shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{path}: dtype {array.dtype}, expected a float or integer type")


def _check_labels(path: Path, classes: int) -> None:
    """Every value is an integer in {-1, 0, ..., classes - 1}."""
    labels = np.load(path, allow_pickle=False)
    bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < IGNORE_LABEL) | (labels >= classes)
    if bad.any():
        value = labels[bad].flat[0].item()
        raise ValueError(
            f"{path}: label value {value!r} is not -1 (unlabelled) or a class in 0..{classes - 1} "
            f"({int(bad.sum())} such pixels)"
        )


def check_split(root: str | os.PathLike, layout: DenseLayout, split: str) -> int:
    """Check ``root/split`` against ``layout`` (module docstring) and return its N.

    Raises:
        ValueError: one line naming the folder or file and what is wrong: a missing split or
            folder, a gap in the numbering, folders of different N, a shape or dtype that is
            not the layout's, a label out of range.
    """
    base = Path(root) / split
    if not base.is_dir():
        raise ValueError(f"{base}: missing: a {layout.name} folder has {' and '.join(SPLITS)} splits")
    folders = ["image"] + [layout.folders[t.name] for t in layout.tasks]
    counts = {folder: _count(base / folder) for folder in folders}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{f} {n}" for f, n in counts.items())
        raise ValueError(f"{base}: its folders hold different numbers of samples ({listed})")
    n = counts["image"]
    h, w = layout.size
    for folder in folders:
        channels = layout.channels(folder)
        shape = (h, w) if channels is None else (h, w, channels)
        for i in range(n):
            _check_header(base / folder / f"{i}.npy", shape)
    segmentation = next(t for t in layout.tasks if t.kind == "segmentation")
    for i in range(n):
        _check_labels(base / layout.folders[segmentation.name] / f"{i}.npy", segmentation.classes)
    return n


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample's augmentation in one epoch, independent of the others."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augment(
    image: torch.Tensor, targets: list[torch.Tensor], tasks: tuple[DenseTask, ...], gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random scale-crop and flip (module docstring); ``image`` (3, H, W), ``targets`` in
    ``tasks``' order: labels (H, W), depth (1, H, W), normals (3, H, W)."""
    height, width = image.shape[-2:]
    scale = SCALES[int(torch.randint(len(SCALES), (1,), generator=gen))]
    h, w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - h + 1, (1,), generator=gen))
    left = int(torch.randint(width - w + 1, (1,), generator=gen))
    flip = bool(torch.rand((), generator=gen) < 0.5)

    def resize(x: torch.Tensor, mode: str) -> torch.Tensor:
        window = x[None, :, top : top + h, left : left + w]
        if mode == "nearest":
            return F.interpolate(window, size=(height, width), mode="nearest")[0]
        return F.interpolate(window, size=(height, width), mode="bilinear", align_corners=True)[0]

    image = resize(image, "bilinear")
    out = []
    for task, target in zip(tasks, targets):
        if task.kind == "segmentation":
            target = resize(target[None].float(), "nearest")[0].long()
        elif task.kind == "depth":
            target = resize(target, "nearest") / scale
        else:
            target = resize(target, "bilinear")
        out.append(target)
    if flip:
        image = image.flip(-1)
        out = [t.flip(-1) for t in out]
        for i, task in enumerate(tasks):
            if task.kind == "normal":
                out[i] = out[i] * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
    return image, out


class DenseDataset(Dataset):
    """One split of a dense data set (module docstring): ``(image (3, H, W) float32, [targets
    in task order])`` with labels int64 (H, W), depth float32 (1, H, W), normals float32 (3, H, W).

    Args:
        root: the data folder (holding ``train/`` and ``val/``).
        layout: ``CITYSCAPES`` or ``NYUV2``.
        split: "train" or "val".
        augment: scale-crop and flip (module docstring); default False.
        seed: the seed of the augmentation. ``set_epoch(e)`` picks the epoch it is drawn for.

    Raises:
        ValueError: from ``check_split``, before any sample is read for training.
    """

    def __init__(
        self, root: str | os.PathLike, layout: DenseLayout, split: str, *, augment: bool = False, seed: int = 0
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.layout, self.split = Path(root), layout, split
        self.size = check_split(root, layout, split)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def _load(self, folder: str, index: int) -> torch.Tensor:
        path = self.root / self.split / folder / f"{index}.npy"
        array = np.load(path, allow_pickle=False)
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image = self._load("image", index).float().permute(2, 0, 1)
        targets = []
        for task in self.layout.tasks:
            target = self._load(self.layout.folders[task.name], index)
            targets.append(target.long() if task.kind == "segmentation" else target.float().permute(2, 0, 1))
        if self.augment:
            image, targets = augment(image, targets, self.layout.tasks, sample_generator(self.seed, self.epoch, index))
        return image.contiguous(), [t.contiguous() for t in targets]
