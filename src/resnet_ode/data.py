"""Image classification datasets: bundled digits, CIFAR-10/100 and ImageNet.

Every loader returns ``(train_dataset, test_dataset, num_classes)`` of torch
Datasets yielding ``(image tensor C x H x W, int label)``. Nothing is ever
downloaded implicitly: a missing dataset raises :class:`DatasetNotFoundError`
naming the directory searched and the command that fetches it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

# torchvision is imported inside the functions that need it: importing it costs
# seconds at the start of every job, and the offline digits data never uses it.

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
DOWNLOADABLE = ("cifar10", "cifar100")

# Per-channel statistics of the training images, on the [0, 1] scale.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

DIGITS_TEST_SIZE = 300
# The digits train/test split is a property of the dataset, like CIFAR's, so
# it does not move with the ``seed`` that picks subsets.
DIGITS_SPLIT_SEED = 0
DIGITS_IMAGE_SIZE = 32


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk where it was looked for."""


class ImageTensorDataset(Dataset):
    """Images held in memory as one tensor, optionally augmented per sample.

    Args:
        images: float tensor N x C x H x W on the [0, 1] scale.
        labels: int64 tensor of N class indices.
        mean: per-channel mean used for normalisation.
        std: per-channel standard deviation used for normalisation.
        augment: random crop of the original size from the image padded by
            ``crop_padding`` zero (black) pixels on each side.
        crop_padding: padding of the random crop, in pixels.
    """

    def __init__(self, images, labels, mean, std, augment=False, crop_padding=4):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"images must be N x C x H x W with one label each, got images "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        self.images = images
        self.labels = labels
        self.mean = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
        self.augment = augment
        self.crop_padding = crop_padding

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if self.augment:
            image = self._random_crop(image)
        return (image - self.mean) / self.std, int(self.labels[index])

    def _random_crop(self, image):
        # Drawn from torch's global generator, which training seeds and
        # checkpoints, so augmented runs resume exactly.
        pad = self.crop_padding
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[:, top : top + image.shape[1], left : left + image.shape[2]]


def load_datasets(
    name: str,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
):
    """Load a classification dataset as train and test torch Datasets.

    - ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797
      images, 10 classes, no download). Pixels 0..16 are scaled to [0, 1],
      resized once to 32x32 (bilinear), copied to 3 channels and normalised
      with the mean and std of the training split. Fixed stratified split:
      1497 train / 300 test. Augmentation is a random 32x32 crop of the image
      padded by 4 pixels, without CIFAR's horizontal flip: a mirrored 2, 3, 4,
      5, 7 or 9 is not the same digit, so a flip would add wrongly labelled
      images.
    - ``"cifar10"``, ``"cifar100"``: torchvision's CIFAR at ``data_dir``
      (``cifar-10-batches-py/`` or ``cifar-100-python/`` inside it); augment =
      random crop with padding 4 + horizontal flip; normalised with the usual
      CIFAR per-channel mean and std.
    - ``"imagenet"``: ImageFolder trees ``data_dir/train`` and
      ``data_dir/val``; train = RandomResizedCrop 224 + horizontal flip
      (Resize 256 + CenterCrop 224 when ``augment`` is False), test = Resize
      256 + CenterCrop 224; ImageNet mean and std.

    Args:
        name: one of ``DATASETS``.
        data_dir: directory holding the dataset; required for everything but
            ``"digits"``, which ignores it.
        train_size: if given, a fixed random subset of this many training
            images (the same images on every call with the same ``seed``).
        test_size: same, for the test images.
        augment: apply the training augmentation to the training set.
        seed: chooses the subsets; keep it fixed across training seeds to
            compare runs on the same images.

    Returns:
        ``(train_dataset, test_dataset, num_classes)``.

    Raises:
        ValueError: unknown ``name``, missing ``data_dir``, or a subset size
            that is not a positive int no larger than the split.
        DatasetNotFoundError: the dataset files are not in ``data_dir``.
        RuntimeError: CIFAR files are present but fail their md5 check.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASETS)}")
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        _check_size(label, size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if name != "digits" and data_dir is None:
        raise ValueError(
            f"dataset {name!r} needs data_dir (command line: --data-dir DIR), the "
            "directory that holds it"
        )

    if name == "digits":
        train, test, num_classes = _load_digits(augment)
    elif name in CIFAR_STATS:
        train, test, num_classes = _load_cifar(name, Path(data_dir), augment)
    else:
        train, test, num_classes = _load_imagenet(Path(data_dir), augment)

    train = _subset(train, train_size, seed, "train_size")
    test = _subset(test, test_size, seed + 1, "test_size")
    return train, test, num_classes


def _check_size(label, size):
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{label} must be a positive int or None, got {size!r}")


def _subset(dataset, size, seed, label):
    """A fixed, seeded random subset of ``size`` items (all of them if None)."""
    if size is None:
        return dataset
    if size > len(dataset):
        raise ValueError(f"{label}={size} exceeds the {len(dataset)} images available")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return Subset(dataset, sorted(order[:size].tolist()))


# ---------------------------------------------------------------- digits


def _load_digits(augment):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # N x 8 x 8
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)

    images = F.interpolate(
        images.unsqueeze(1),  # N x 1 x 8 x 8
        size=(DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE),
        mode="bilinear",
        align_corners=False,
    )
    images = images.expand(-1, 3, -1, -1).contiguous()  # N x 3 x 32 x 32

    train_index, test_index = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_SIZE,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_index, test_index = np.sort(train_index), np.sort(test_index)

    # The three channels are copies, so one scalar mean and std serve all.
    mean = images[train_index].mean().item()
    std = images[train_index].std().item()
    stats = ((mean,) * 3, (std,) * 3)
    train = ImageTensorDataset(
        images[train_index], labels[train_index], *stats, augment=augment
    )
    test = ImageTensorDataset(images[test_index], labels[test_index], *stats)
    return train, test, 10


# ---------------------------------------------------------------- CIFAR


def _cifar_class(name):
    from torchvision import datasets

    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def _cifar_transforms(name, augment):
    from torchvision import transforms

    mean, std = CIFAR_STATS[name]
    to_normalised = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train = to_normalised
    if augment:
        train = [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            *to_normalised,
        ]
    return transforms.Compose(train), transforms.Compose(to_normalised)


def _missing_cifar_files(name, data_dir):
    cls = _cifar_class(name)
    folder = data_dir / cls.base_folder
    expected = [entry[0] for entry in cls.train_list + cls.test_list]
    expected.append(cls.meta["filename"])
    return folder, [file for file in expected if not (folder / file).is_file()]


def _load_cifar(name, data_dir, augment):
    folder, missing = _missing_cifar_files(name, data_dir)
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: looked in {folder} and did not find "
            f"{', '.join(missing)}. Get it with `resnet-ode download {name} "
            f"--data-dir {data_dir}` (downloads from the official site and "
            "checks the md5), then rerun with the same data directory."
        )

    train_transform, test_transform = _cifar_transforms(name, augment)
    cls = _cifar_class(name)
    try:
        train = cls(data_dir, train=True, transform=train_transform, download=False)
        test = cls(data_dir, train=False, transform=test_transform, download=False)
    except RuntimeError as error:
        raise RuntimeError(
            f"{name} files in {folder} fail torchvision's md5 check ({error}); "
            f"delete {folder} and fetch it again with `resnet-ode download {name} "
            f"--data-dir {data_dir}`"
        ) from error
    return train, test, len(train.classes)


def download_dataset(name: str, data_dir: str | os.PathLike) -> Path:
    """Download a dataset into ``data_dir`` through torchvision, md5-checked.

    Files already present and intact are not downloaded again.

    Args:
        name: one of ``DOWNLOADABLE`` ("cifar10", "cifar100").
        data_dir: directory to put the dataset in (created).

    Returns:
        The folder holding the dataset files.

    Raises:
        ValueError: ``name`` cannot be downloaded: "digits" ships with
            scikit-learn, ImageNet must be obtained by hand (its licence
            requires a login), anything else is unknown.
        RuntimeError: the download fails or fails its md5 check.
    """
    if name not in DOWNLOADABLE:
        raise ValueError(
            f"cannot download {name!r}; downloadable: {list(DOWNLOADABLE)}. "
            "'digits' ships with scikit-learn; 'imagenet' must be fetched by "
            "hand into DIR/train and DIR/val class folders."
        )
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    cls = _cifar_class(name)
    cls(data_dir, train=True, download=True)
    cls(data_dir, train=False, download=False)
    return data_dir / cls.base_folder


# ---------------------------------------------------------------- ImageNet


def _imagenet_transforms(augment):
    from torchvision import transforms

    normalise = [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
    evaluation = [transforms.Resize(256), transforms.CenterCrop(224), *normalise]
    train = evaluation
    if augment:
        train = [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            *normalise,
        ]
    return transforms.Compose(train), transforms.Compose(evaluation)


def _load_imagenet(data_dir, augment):
    from torchvision import datasets

    train_dir, val_dir = data_dir / "train", data_dir / "val"
    missing = [str(path) for path in (train_dir, val_dir) if not path.is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"imagenet not found: looked for the directories {train_dir} and "
            f"{val_dir}; missing: {', '.join(missing)}. ImageNet is not "
            "downloaded automatically: put the ILSVRC-2012 images there as one "
            "sub-folder per class (the ImageFolder layout) in both train and val."
        )

    train_transform, test_transform = _imagenet_transforms(augment)
    train = datasets.ImageFolder(train_dir, transform=train_transform)
    test = datasets.ImageFolder(val_dir, transform=test_transform)
    if train.classes != test.classes:
        raise ValueError(
            f"class folders differ between {train_dir} ({len(train.classes)} "
            f"classes) and {val_dir} ({len(test.classes)} classes)"
        )
    return train, test, len(train.classes)
