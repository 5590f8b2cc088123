"""The experiments' loaders on tiny data sets in the real layouts: what they return, their
augmentation, and the malformed folders they refuse in one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from experiment_fixtures import write_celeba, write_dense

from cost_fast.experiments import celeba_data, dense_data
from cost_fast.experiments.dense_data import CITYSCAPES, NYUV2, DenseDataset, augment, check_split, sample_generator
from cost_fast.experiments.synthetic import SyntheticCelebA, SyntheticDense

SMALL_NYUV2 = dataclasses.replace(NYUV2, size=(32, 64))  # the layout at a small size, for speed


@pytest.mark.parametrize("layout", [CITYSCAPES, SMALL_NYUV2], ids=["cityscapes", "nyuv2"])
def test_dense_samples_are_the_files(tmp_path, layout) -> None:
    root = write_dense(tmp_path, layout, {"train": 3, "val": 2})
    data = DenseDataset(root, layout, "train")
    assert len(data) == 3 and len(DenseDataset(root, layout, "val")) == 2
    image, targets = data[1]
    h, w = layout.size
    assert image.shape == (3, h, w) and image.dtype == torch.float32
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.load(root / "train/image/1.npy"))
    for task, target in zip(layout.tasks, targets):
        stored = np.load(root / "train" / layout.folders[task.name] / "1.npy")
        if task.kind == "segmentation":
            assert target.dtype == torch.int64 and target.shape == (h, w)
            np.testing.assert_array_equal(target.numpy(), stored)
        else:
            assert target.dtype == torch.float32 and target.shape == (task.channels, h, w)
            np.testing.assert_array_equal(target.permute(1, 2, 0).numpy(), stored)


def test_dense_augmentation_is_drawn_per_sample_and_epoch(tmp_path) -> None:
    root = write_dense(tmp_path, SMALL_NYUV2, {"train": 2, "val": 1})
    data = DenseDataset(root, SMALL_NYUV2, "train", augment=True, seed=3)
    first = data[0][0]
    assert torch.equal(data[0][0], first)  # the same sample in the same epoch: the same draw
    again = DenseDataset(root, SMALL_NYUV2, "train", augment=True, seed=3)
    assert torch.equal(again[0][0], first)  # another loader (a worker, a resumed run): the same
    draws = set()
    for epoch in range(8):
        data.set_epoch(epoch)
        draws.add(data[0][0].sum().item())
    assert len(draws) > 1  # epochs draw anew


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_scales_depth_flips_normals_and_keeps_labels(seed) -> None:
    h, w = 24, 48
    image = torch.rand(3, h, w)
    labels = torch.randint(-1, 5, (h, w))
    depth = torch.full((1, h, w), 3.0)
    normal = torch.zeros(3, h, w)
    normal[0], normal[2] = 0.6, 0.8  # one unit normal everywhere, x component 0.6
    tasks = NYUV2.tasks
    gen = sample_generator(0, 0, seed)
    scale = dense_data.SCALES[int(torch.randint(len(dense_data.SCALES), (1,), generator=sample_generator(0, 0, seed)))]
    out_image, (out_labels, out_depth, out_normal) = augment(image, [labels, depth, normal], tasks, gen)
    assert out_image.shape == image.shape and out_labels.shape == labels.shape
    assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist())  # nearest: no new label
    torch.testing.assert_close(out_depth, torch.full_like(depth, 3.0 / scale))  # closer by the zoom
    assert torch.allclose(out_normal[0].abs(), torch.tensor(0.6)) and torch.allclose(out_normal[2], torch.tensor(0.8))
    flipped = bool(out_normal[0, 0, 0] < 0)  # a flip negates x
    if scale == 1.0 and not flipped:
        assert torch.equal(out_image, image) and torch.equal(out_labels, labels)
    if scale == 1.0 and flipped:
        torch.testing.assert_close(out_image, image.flip(-1))


def _break(root, what: str) -> str:
    """Damage a CityScapes fixture; returns what the refusal must say."""
    if what == "missing split":
        for f in (root / "val").rglob("*.npy"):
            f.unlink()
        for d in sorted((root / "val").rglob("*"), reverse=True):
            d.rmdir()
        (root / "val").rmdir()
        return "val: missing"
    if what == "missing folder":
        for f in (root / "train/depth").iterdir():
            f.unlink()
        (root / "train/depth").rmdir()
        return "train/depth: missing"
    if what == "gap":
        (root / "train/label_7/1.npy").rename(root / "train/label_7/5.npy")
        return "1.npy is missing"
    if what == "counts":
        np.save(root / "train/image/3.npy", np.zeros((128, 256, 3), np.float32))
        return "different numbers of samples"
    if what == "shape":
        np.save(root / "train/depth/0.npy", np.zeros((128, 256), np.float32))
        return r"train/depth/0.npy: shape \(128, 256\), expected \(128, 256, 1\)"
    if what == "dtype":
        np.save(root / "train/image/2.npy", np.zeros((128, 256, 3), dtype="<U1"))
        return "dtype <U1"
    if what == "label range":
        labels = np.zeros((128, 256), np.float32)
        labels[5, 7] = 7  # CityScapes' label_7 has classes 0..6
        np.save(root / "val/label_7/1.npy", labels)
        return r"val/label_7/1.npy: label value 7.0 is not -1 \(unlabelled\) or a class in 0..6"
    if what == "label fraction":
        np.save(root / "train/label_7/0.npy", np.full((128, 256), 0.5, np.float32))
        return "label value 0.5"
    if what == "not npy":
        (root / "train/image/1.npy").write_text("not an array")
        return "train/image/1.npy: not a readable .npy file"
    raise AssertionError(what)


CASES = [
    "missing split",
    "missing folder",
    "gap",
    "counts",
    "shape",
    "dtype",
    "label range",
    "label fraction",
    "not npy",
]


@pytest.mark.parametrize("what", CASES)
def test_a_malformed_dense_folder_is_refused_in_one_line(tmp_path, what) -> None:
    root = write_dense(tmp_path, CITYSCAPES, {"train": 3, "val": 2})
    message = _break(root, what)
    with pytest.raises(ValueError, match=message) as caught:
        for split in dense_data.SPLITS:
            check_split(root, CITYSCAPES, split)
    assert "\n" not in str(caught.value)


def test_a_non_finite_image_is_refused_when_it_is_loaded(tmp_path) -> None:
    root = write_dense(tmp_path, CITYSCAPES, {"train": 2, "val": 1})
    image = np.zeros((128, 256, 3), np.float32)
    image[3, 4, 0] = np.nan
    np.save(root / "train/image/1.npy", image)
    data = DenseDataset(root, CITYSCAPES, "train")
    data[0]
    with pytest.raises(ValueError, match="train/image/1.npy: holds NaN"):
        data[1]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "as shipped"])
def test_celeba_samples_are_the_files(tmp_path, nested) -> None:
    from PIL import Image

    root = write_celeba(tmp_path, (4, 2, 3), nested=nested)
    splits = celeba_data.CelebADataset.splits(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 3}
    image, labels = splits["val"][1]  # the 6th image of the list
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    folder = root / ("Img" if nested else "") / "img_align_celeba"
    expected = np.asarray(Image.open(folder / "000006.jpg").convert("RGB").resize((64, 64), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    attr = (root / ("Anno" if nested else "") / "list_attr_celeba.txt").read_text().splitlines()[7].split()
    assert attr[0] == "000006.jpg" and labels.tolist() == [float(v == "1") for v in attr[1:]]


def _break_celeba(root, what: str) -> str:
    attr, partition = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    lines = attr.read_text().splitlines()
    if what == "no list":
        partition.unlink()
        return "no list_eval_partition.txt"
    if what == "count":
        attr.write_text("\n".join(["99"] + lines[1:]) + "\n")
        return "line 1 says 99 images"
    if what == "attributes":
        attr.write_text("\n".join([lines[0], " ".join(lines[1].split()[:39])] + lines[2:]) + "\n")
        return "line 2 names 39 attributes"
    if what == "value":
        lines[4] = lines[4].replace(" 1", " 2", 1) if " 1" in lines[4] else lines[4].replace(" -1", " 2", 1)
        attr.write_text("\n".join(lines) + "\n")
        return "line 5 must be a file name and 40 values"
    if what == "image":
        (root / "img_align_celeba" / "000002.jpg").unlink()
        return "000002.jpg is missing"
    if what == "split":
        text = partition.read_text().replace(" 2\n", " 1\n")
        partition.write_text(text)
        return r"the test split \(2\) is empty"
    if what == "unlisted":
        partition.write_text("\n".join(partition.read_text().splitlines()[1:]) + "\n")
        return "no split for 000001.jpg"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["no list", "count", "attributes", "value", "image", "split", "unlisted"])
def test_a_malformed_celeba_folder_is_refused_in_one_line(tmp_path, what) -> None:
    root = write_celeba(tmp_path)
    message = _break_celeba(root, what)
    with pytest.raises(ValueError, match=message) as caught:
        celeba_data.check_folder(root)
    assert "\n" not in str(caught.value)


def test_synthetic_data_has_the_real_shapes_and_is_the_same_each_time() -> None:
    dense = SyntheticDense(NYUV2, 3, seed=1)
    image, (labels, depth, normal) = dense[2]
    assert image.shape == (3, 288, 384) and labels.shape == (288, 384) and labels.dtype == torch.int64
    assert depth.shape == (1, 288, 384) and normal.shape == (3, 288, 384)
    assert labels.min() >= -1 and labels.max() < 13 and (depth == 0).any() and (labels == -1).any()
    torch.testing.assert_close(normal.norm(dim=0), torch.ones(288, 384))
    assert torch.equal(SyntheticDense(NYUV2, 3, seed=1)[2][0], image)
    faces = SyntheticCelebA(4, seed=0)
    x, y = faces[3]
    assert x.shape == (3, 64, 64) and y.shape == (40,) and set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(SyntheticCelebA(4, seed=0)[3][1], y)
