"""Tiny data sets in the real on-disk layouts of CityScapes and NYUv2 (MTAN's preprocessed
``.npy`` files) and CelebA (JPEGs and the two list files), for the loaders and ``cost-fast train``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cost_fast.experiments.dense_data import DenseLayout


def write_dense(root: Path, layout: DenseLayout, counts: dict[str, int], seed: int = 0) -> Path:
    """``root/{train,val}/{image,<label>,depth,normal}/{i}.npy`` for ``layout`` (float32 files as
    MTAN's, labels with -1 and depths with 0 in places)."""
    rng = np.random.default_rng(seed)
    h, w = layout.size
    for split, n in counts.items():
        for i in range(n):
            arrays = {"image": rng.random((h, w, 3), dtype=np.float32)}
            for task in layout.tasks:
                if task.kind == "segmentation":
                    labels = rng.integers(-1, task.classes, (h, w)).astype(np.float32)
                    arrays[layout.folders[task.name]] = labels
                elif task.kind == "depth":
                    depth = rng.random((h, w, 1), dtype=np.float32) + 0.1
                    depth[rng.random((h, w, 1)) < 0.1] = 0
                    arrays[layout.folders[task.name]] = depth
                else:
                    normal = rng.normal(size=(h, w, 3)).astype(np.float32)
                    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                    normal[rng.random((h, w)) < 0.1] = 0
                    arrays[layout.folders[task.name]] = normal
            for folder, array in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
    return root


def write_celeba(root: Path, splits: tuple[int, int, int] = (6, 3, 3), *, nested: bool = False, seed: int = 0) -> Path:
    """CelebA's files for ``splits`` = (train, val, test) images of 178x218 (the aligned size);
    ``nested``: in Img/, Anno/, Eval/ as the data set ships them."""
    from PIL import Image

    from cost_fast.experiments.paper import CELEBA_ATTRIBUTES

    rng = np.random.default_rng(seed)
    images = root / ("Img" if nested else "") / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(sum(splits))]
    codes = [0] * splits[0] + [1] * splits[1] + [2] * splits[2]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(images / name)
    labels = rng.choice(["1", "-1"], size=(len(names), len(CELEBA_ATTRIBUTES)))
    attr = [str(len(names)), " ".join(CELEBA_ATTRIBUTES)] + [f"{n} " + " ".join(row) for n, row in zip(names, labels)]
    (root / ("Anno" if nested else "")).mkdir(exist_ok=True)
    (root / ("Anno" if nested else "") / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    (root / ("Eval" if nested else "")).mkdir(exist_ok=True)
    partition = "\n".join(f"{n} {c}" for n, c in zip(names, codes)) + "\n"
    (root / ("Eval" if nested else "") / "list_eval_partition.txt").write_text(partition)
    return root
