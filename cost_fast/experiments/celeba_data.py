"""CelebA's 40 binary face attributes, from the data set's standard files, checked before any work.

Layout: ``img_align_celeba/`` (the aligned JPEGs), ``list_attr_celeba.txt`` (a count, the 40
attribute names, then one line per image: its file name and 40 values of 1 or -1) and
``list_eval_partition.txt`` (one line per image: its file name and 0 train, 1 val, 2 test),
either all in DIR or in DIR/Img, DIR/Anno and DIR/Eval as the data set ships them.

Each sample is the image resized to 64x64 (bilinear) as floats in [0, 1], shape (3, 64, 64), and
its 40 attributes as 0/1 floats, the FairGrad/FAMO/COST setup. ``check_folder`` reads both lists
whole and the image folder's listing, and says in one line what is wrong and where.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

NUM_ATTRIBUTES = 40
IMAGE_SIZE = 64
SPLITS = {"train": 0, "val": 1, "test": 2}
_PLACES = {
    "img_align_celeba": ("", "Img"),
    "list_attr_celeba.txt": ("", "Anno"),
    "list_eval_partition.txt": ("", "Eval"),
}


def _find(root: Path, name: str) -> Path:
    for sub in _PLACES[name]:
        path = root / sub / name
        if path.exists():
            return path
    raise ValueError(f"{root}: no {name} in it (nor in {root / _PLACES[name][1]})")


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, image names, 0/1 labels (N, 40)) from ``list_attr_celeba.txt``."""
    lines = path.read_text().splitlines()
    if len(lines) < 3 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the number of images")
    names = lines[1].split()
    if len(names) != NUM_ATTRIBUTES:
        raise ValueError(f"{path}: line 2 names {len(names)} attributes, expected {NUM_ATTRIBUTES}")
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images, the file lists {len(rows)}")
    labels = np.zeros((len(rows), NUM_ATTRIBUTES), dtype=np.float32)
    for i, row in enumerate(rows):
        if len(row) != NUM_ATTRIBUTES + 1 or any(v not in ("1", "-1") for v in row[1:]):
            raise ValueError(f"{path}: line {i + 3} must be a file name and {NUM_ATTRIBUTES} values of 1 or -1")
        labels[i] = [v == "1" for v in row[1:]]
    return names, [row[0] for row in rows], labels


def read_partition(path: Path) -> dict[str, int]:
    """image name → split (0, 1, 2) from ``list_eval_partition.txt``."""
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}: line {number} must be a file name and 0, 1 or 2")
        partition[fields[0]] = int(fields[1])
    return partition


def check_folder(root: str | os.PathLike) -> tuple[Path, list[str], list[str], np.ndarray, dict[str, int]]:
    """Check a CelebA folder (module docstring); returns (image folder, attribute names, image
    names, labels, partition).

    Raises:
        ValueError: one line naming the file and what is wrong: a missing file or folder, a
            malformed line, an image listed in one file and not the other or not on disk, an
            empty split.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    images = _find(root, "img_align_celeba")
    attr_path, partition_path = _find(root, "list_attr_celeba.txt"), _find(root, "list_eval_partition.txt")
    names, files, labels = read_attributes(attr_path)
    partition = read_partition(partition_path)
    unlisted = [f for f in files if f not in partition]
    if unlisted:
        raise ValueError(f"{partition_path}: no split for {unlisted[0]} (listed in {attr_path.name})")
    on_disk = set(os.listdir(images)) if images.is_dir() else set()
    absent = [f for f in files if f not in on_disk]
    if absent:
        raise ValueError(f"{images}: {absent[0]} is missing ({len(absent)} listed images are)")
    for split, code in SPLITS.items():
        if not any(partition[f] == code for f in files):
            raise ValueError(f"{partition_path}: the {split} split ({code}) is empty")
    return images, names, files, labels, partition


def load_image(path: Path) -> torch.Tensor:
    """The image at ``path`` as RGB floats in [0, 1] resized to 64x64, shape (3, 64, 64)."""
    from PIL import Image

    with Image.open(path) as image:
        resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CelebADataset(Dataset):
    """One split of CelebA (module docstring): ``(image (3, 64, 64), attributes (40,))``.

    Args:
        root: the data folder. split: "train", "val" or "test".
        checked: what ``check_folder(root)`` returned, if it was called already.

    Raises:
        ValueError: from ``check_folder``, or an unknown split.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, checked: tuple | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        self.images, self.attribute_names, files, labels, partition = checked or check_folder(root)
        chosen = [i for i, f in enumerate(files) if partition[f] == SPLITS[split]]
        self.files = [files[i] for i in chosen]
        self.labels = torch.from_numpy(labels[chosen])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image(self.images / self.files[index]), self.labels[index]

    @classmethod
    def splits(cls, root: str | os.PathLike) -> dict[str, CelebADataset]:
        """The three splits, the folder checked once."""
        checked = check_folder(root)
        return {split: cls(root, split, checked=checked) for split in SPLITS}
