"""Datasets: bundled digits, CIFAR through torchvision's real loader, ImageFolder.

The CIFAR tests write small files in the real on-disk format and read them
with torchvision's own CIFAR10/CIFAR100 classes.
"""

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets

from resnet_ode.data import (
    CIFAR_STATS,
    DATASETS,
    DatasetNotFoundError,
    download_dataset,
    load_datasets,
)

# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_datasets("digits", augment=False)


def stacked(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_digits_split_shapes_and_classes(digits):
    train, test, num_classes = digits
    train_images, train_labels = stacked(train)
    _, test_labels = stacked(test)

    assert num_classes == 10
    assert (len(train), len(test)) == (1497, 300)
    assert train_images.shape == (1497, 3, 32, 32)
    # The three channels are copies of one grayscale image.
    assert torch.equal(train_images[:, 0], train_images[:, 2])
    # Stratified: each class has 29 to 31 of the 300 test images (~1/10 each).
    counts = torch.bincount(test_labels, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31
    assert set(train_labels.tolist()) == set(range(10))


def test_digits_normalised_with_training_statistics(digits):
    train_images, _ = stacked(digits[0])

    # Mean 0 and std 1 over the training pixels by construction; 1e-4 allows
    # float32 round-off accumulated over 1.5 M pixels.
    assert abs(train_images.mean().item()) < 1e-4
    assert abs(train_images.std().item() - 1) < 1e-4


def test_digits_are_bilinear_resizes_of_the_sklearn_images(digits):
    train, test, _ = digits
    originals = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    resized = F.interpolate(originals[:, None], size=(32, 32), mode="bilinear")
    test_images, test_labels = stacked(test)

    # Undo the normalisation using two pixels: background (0) and the maximum.
    image = test_images[0, 0]
    matches = [
        index
        for index in range(len(resized))
        if torch.allclose(
            (image - image.min()) / (image.max() - image.min()),
            (resized[index, 0] - resized[index, 0].min())
            / (resized[index, 0].max() - resized[index, 0].min()),
            atol=1e-5,  # float32 round-off of normalise then rescale
        )
    ]
    assert matches, "first test image is not a resized sklearn digit"
    assert all(load_digits().target[i] == test_labels[0] for i in matches)


def test_digits_augmentation_shifts_without_flipping():
    train, _, _ = load_datasets("digits", train_size=20, augment=True)
    plain, _, _ = load_datasets("digits", train_size=20, augment=False)
    torch.manual_seed(0)

    for index in range(len(train)):
        augmented, label = train[index]
        original, plain_label = plain[index]
        assert label == plain_label
        background = original.min()  # normalised value of a 0 pixel
        padded = F.pad(original, (4, 4, 4, 4), value=background.item())
        crops = [
            padded[:, top : top + 32, left : left + 32]
            for top in range(9)
            for left in range(9)
        ]
        # Every augmented image is one of the 81 shifted crops; a flip would
        # not be (the digits are not mirror symmetric).
        assert any(torch.allclose(augmented, crop, atol=1e-6) for crop in crops)


def test_digits_subsets_are_fixed_by_seed():
    first, first_test, _ = load_datasets("digits", train_size=50, test_size=20)
    again, again_test, _ = load_datasets("digits", train_size=50, test_size=20)
    other, _, _ = load_datasets("digits", train_size=50, test_size=20, seed=1)

    assert (len(first), len(first_test)) == (50, 20)
    assert first.indices == again.indices
    assert first_test.indices == again_test.indices
    assert first.indices != other.indices


@pytest.mark.parametrize("size", [0, -3, 2.5, True, 1498])
def test_bad_subset_size_is_rejected(size):
    with pytest.raises(ValueError, match="train_size"):
        load_datasets("digits", train_size=size)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="mnist") as error:
        load_datasets("mnist")
    assert all(name in str(error.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_missing_data_dir_names_the_setting(name):
    with pytest.raises(ValueError, match="data_dir.*--data-dir"):
        load_datasets(name)


# ---------------------------------------------------------------- CIFAR

# Real CIFAR files are Python pickles of dicts whose keys torchvision reads as
# str (it unpickles with encoding="latin1"; b"data"-style keys only appear
# when unpickling with encoding="bytes"). Images are rows of 3072 uint8:
# the 32x32 red plane, then green, then blue, each row-major.
LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "classes": 100,
    },
}


def write_pickle(path, obj):
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def write_batch(path, layout, rng, count):
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = rng.integers(0, layout["classes"], size=count).tolist()
    batch = {
        "batch_label": path.name,
        "data": data,
        layout["label_key"]: labels,
        "filenames": [f"image_{i}.png" for i in range(count)],
    }
    if layout["label_key"] == "fine_labels":
        batch["coarse_labels"] = [label // 5 for label in labels]
    write_pickle(path, batch)
    return data, labels


def write_cifar(root, name, per_batch=4, test_count=6):
    """Write a tiny CIFAR in the real layout; returns train and test arrays."""
    layout = LAYOUT[name]
    folder = root / layout["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = [
        write_batch(folder / file, layout, rng, per_batch) for file in layout["train"]
    ]
    test = [
        write_batch(folder / file, layout, rng, test_count) for file in layout["test"]
    ]
    names = [f"class_{i}" for i in range(layout["classes"])]
    write_pickle(folder / layout["meta"], {layout["names_key"]: names})
    return concatenated(train), concatenated(test)


def concatenated(batches):
    """All images and labels of a list of (data, labels) batches."""
    data = np.concatenate([data for data, _ in batches])
    labels = [label for _, batch_labels in batches for label in batch_labels]
    return data, labels


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust_written_files(monkeypatch, root, name):
    """Point torchvision's md5 table at the files this test wrote.

    torchvision 0.29 checks every CIFAR file against fixed md5 sums of the
    official release (class attributes train_list, test_list, meta), which
    files written here cannot match. Only those expected sums are replaced;
    torchvision's own integrity check and loader still run on the files.
    """
    layout = LAYOUT[name]
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = root / layout["folder"]
    for attribute in ("train_list", "test_list"):
        entries = [[file, md5(folder / file)] for file in layout[attribute[:-5]]]
        monkeypatch.setattr(cls, attribute, entries)
    meta = dict(cls.meta, md5=md5(folder / layout["meta"]))
    monkeypatch.setattr(cls, "meta", meta)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_real_format_through_torchvision(tmp_path, monkeypatch, name):
    (train_data, train_labels), (test_data, test_labels) = write_cifar(tmp_path, name)
    trust_written_files(monkeypatch, tmp_path, name)

    train, test, num_classes = load_datasets(name, tmp_path, augment=False)

    assert num_classes == LAYOUT[name]["classes"]
    assert (len(train), len(test)) == (len(train_data), len(test_data))
    mean, std = (torch.tensor(stat).view(3, 1, 1) for stat in CIFAR_STATS[name])
    for dataset, data, labels in (
        (train, train_data, train_labels),
        (test, test_data, test_labels),
    ):
        for index in (0, len(dataset) - 1):
            image, label = dataset[index]
            expected = torch.from_numpy(data[index].reshape(3, 32, 32)) / 255.0
            assert image.shape == (3, 32, 32)
            # Undoing the normalisation recovers the stored bytes up to
            # float32 round-off.
            assert torch.allclose(image * std + mean, expected, atol=1e-5)
            assert label == labels[index]


def test_cifar_augmentation_crops_and_flips(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    trust_written_files(monkeypatch, tmp_path, "cifar10")
    train, test, _ = load_datasets("cifar10", tmp_path, augment=True)
    plain, plain_test, _ = load_datasets("cifar10", tmp_path, augment=False)
    mean, std = (torch.tensor(stat).view(3, 1, 1) for stat in CIFAR_STATS["cifar10"])
    # RandomCrop pads the raw image with black, which normalises to -mean/std.
    padded = torch.cat([-mean / std] * 40, 1).repeat(1, 1, 40)  # 3 x 40 x 40
    padded[:, 4:36, 4:36] = plain[0][0]
    torch.manual_seed(0)

    flips = []
    for _ in range(30):
        draw = train[0][0]
        for flipped, source in ((False, padded), (True, padded.flip(-1))):
            crops = [
                source[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)
            ]
            if any(torch.allclose(draw, crop, atol=1e-6) for crop in crops):
                flips.append(flipped)
                break

    # Every draw is a shifted crop of the image or of its mirror image, and
    # both occur (all 30 unflipped would have probability 2**-30).
    assert len(flips) == 30
    assert any(flips) and not all(flips)
    # The test split is never augmented.
    assert all(torch.equal(test[i][0], plain_test[i][0]) for i in range(len(test)))


def test_cifar_subset(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    trust_written_files(monkeypatch, tmp_path, "cifar10")

    train, test, _ = load_datasets("cifar10", tmp_path, train_size=7, test_size=3)

    assert (len(train), len(test)) == (7, 3)
    with pytest.raises(ValueError, match="train_size=21 exceeds the 20"):
        load_datasets("cifar10", tmp_path, train_size=21)


def test_cifar_with_wrong_checksums_fails_torchvisions_real_check(tmp_path):
    # Files written here do not match the official md5 sums: the unpatched
    # integrity check must refuse them, and the error must say where they are.
    write_cifar(tmp_path, "cifar10")

    with pytest.raises(RuntimeError, match="md5") as error:
        load_datasets("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_names_directory_and_download_command(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as error:
        load_datasets(name, tmp_path / "nowhere")

    message = str(error.value)
    assert str(tmp_path / "nowhere" / LAYOUT[name]["folder"]) in message
    assert f"resnet-ode download {name} --data-dir {tmp_path / 'nowhere'}" in message
    assert isinstance(error.value, FileNotFoundError)


def test_download_of_present_dataset_does_not_touch_the_network(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10")
    trust_written_files(monkeypatch, tmp_path, "cifar10")

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although the files are intact")

    monkeypatch.setattr(datasets.cifar, "download_and_extract_archive", no_network)

    folder = download_dataset("cifar10", tmp_path)

    assert folder == tmp_path / "cifar-10-batches-py"


@pytest.mark.parametrize("name", ["imagenet", "digits", "svhn"])
def test_download_refuses_other_datasets(tmp_path, name):
    with pytest.raises(ValueError, match="cifar10"):
        download_dataset(name, tmp_path)


# ---------------------------------------------------------------- ImageNet


def write_image_folder(root, classes, per_class, size):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


def test_imagenet_image_folders_give_224_crops(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog", "eel"], 2, (40, 50))
    write_image_folder(tmp_path / "val", ["cat", "dog", "eel"], 1, (30, 20))

    train, test, num_classes = load_datasets("imagenet", tmp_path)

    assert num_classes == 3
    assert (len(train), len(test)) == (6, 3)
    assert train[0][0].shape == (3, 224, 224)
    assert test[2][0].shape == (3, 224, 224)
    assert [test[i][1] for i in range(3)] == [0, 1, 2]


def test_imagenet_class_mismatch_is_rejected(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog"], 1, (8, 8))
    write_image_folder(tmp_path / "val", ["cat", "eel"], 1, (8, 8))

    with pytest.raises(ValueError, match="class folders differ"):
        load_datasets("imagenet", tmp_path)


def test_missing_imagenet_names_both_directories(tmp_path):
    write_image_folder(tmp_path / "train", ["cat"], 1, (8, 8))

    with pytest.raises(DatasetNotFoundError) as error:
        load_datasets("imagenet", tmp_path)

    message = str(error.value)
    assert str(tmp_path / "train") in message and str(tmp_path / "val") in message
    assert f"missing: {tmp_path / 'val'}" in message
