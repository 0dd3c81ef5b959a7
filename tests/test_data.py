"""Data loading from each source on tiny generated stand-ins, splits and batches."""
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mesa_utils.data import (STATS, DataError, Loader, augment, load_cifar, normalize,
                             split_test)

RNG = np.random.default_rng(0)


def _write_torchvision_cifar(root, name, n_train=30, n_test=20):
    """A tiny stand-in in torchvision's pickled layout; returns the arrays written."""
    n_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    train_x = RNG.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    test_x = RNG.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    train_y = RNG.integers(0, n_classes, n_train).tolist()
    test_y = RNG.integers(0, n_classes, n_test).tolist()

    def dump(file, obj):
        with open(folder / file, "wb") as f:
            pickle.dump(obj, f)
    if name == "cifar10":
        dump("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
            dump(f"data_batch_{i + 1}", {b"data": train_x[part], key: [train_y[j] for j in part]})
        dump("test_batch", {b"data": test_x, key: test_y})
    else:
        dump("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
        dump("train", {b"data": train_x, key: train_y})
        dump("test", {b"data": test_x, key: test_y})
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_layout_loads_and_caches(tmp_path, name):
    train_x, train_y, _, test_y = _write_torchvision_cifar(tmp_path, name)
    data = load_cifar(name, root=tmp_path, download=False)
    assert data.train_images.shape == (30, 32, 32, 3) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (20, 32, 32, 3)
    assert data.train_labels.tolist() == train_y and data.test_labels.tolist() == test_y
    assert len(data.classes) == (10 if name == "cifar10" else 100)
    # channel-major rows of 3072 bytes become (H, W, C)
    assert torch.equal(data.train_images[0, :, :, 1].flatten(),
                       torch.from_numpy(train_x[0, 1024:2048]))
    assert (tmp_path / name / "classes.json").exists()
    (tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
     / ("test_batch" if name == "cifar10" else "test")).unlink()
    again = load_cifar(name, root=tmp_path, download=False)     # served from the .npy cache
    assert torch.equal(again.train_images, data.train_images)


def _write_archive(path, classes=("airplane", "bird", "cat"), per_class=2):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c in classes:
                for k in range(per_class):
                    buffer = io.BytesIO()
                    pixels = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"top/{split}/{c}/{k:04d}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


def _ten_class_archive(tmp_path):
    path = tmp_path / "ten.tar.gz"
    _write_archive(path, classes=[f"class{i}" for i in range(10)])
    return path


def test_image_folder_archive_sorted_classes(tmp_path):
    path = _ten_class_archive(tmp_path)
    data = load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    assert data.classes == [f"class{i}" for i in range(10)]
    assert data.train_images.shape == (20, 32, 32, 3)
    assert data.train_labels.tolist() == [i for i in range(10) for _ in range(2)]


def test_archive_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", str(_ten_class_archive(tmp_path)))
    data = load_cifar("cifar10", root=tmp_path / "cache", download=False)
    assert len(data.test_images) == 20


def test_archive_with_wrong_class_count_is_rejected(tmp_path):
    path = tmp_path / "three.tar.gz"
    _write_archive(path)
    with pytest.raises(DataError, match="expected 10 classes"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_corrupt_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(DataError, match="corrupt"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_truncated_archive_is_a_clear_error(tmp_path):
    path = _ten_class_archive(tmp_path)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    path = _ten_class_archive(tmp_path)
    (tmp_path / "ten.tar.gz.sha256").write_text(hashlib.sha256(b"other").hexdigest() + "  x\n")
    with pytest.raises(DataError, match="checksum"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar("cifar10", root=tmp_path, archive=tmp_path / "nope.tar.gz", download=False)


def test_no_source_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("MESA_CIFAR100_ARCHIVE", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(DataError) as err:
        load_cifar("cifar100", root=tmp_path, download=False)
    message = str(err.value)
    assert "cifar-100-python" in message and "MESA_CIFAR100_ARCHIVE" in message
    assert "download" in message


def test_corrupt_cache_is_a_clear_error(tmp_path):
    _write_torchvision_cifar(tmp_path, "cifar10")
    load_cifar("cifar10", root=tmp_path, download=False)
    (tmp_path / "cifar10" / "train_images.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete the folder"):
        load_cifar("cifar10", root=tmp_path, download=False)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set"):
        load_cifar("mnist")


def test_split_test_is_seeded_disjoint_and_complete():
    defense, held_out = split_test(10000, 2000, seed=0)
    assert len(defense) == 8000 and len(held_out) == 2000
    assert sorted(torch.cat([defense, held_out]).tolist()) == list(range(10000))
    again, _ = split_test(10000, 2000, seed=0)
    other, _ = split_test(10000, 2000, seed=1)
    assert torch.equal(defense, again) and not torch.equal(defense, other)


def test_normalize_is_channels_last_and_standardised():
    images = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    mean, std = (torch.tensor(s) for s in STATS["cifar10"])
    x = normalize(images, mean, std)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)


def test_augment_returns_shifted_or_flipped_crops():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(2):
        candidates = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_loader_visits_each_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 32, 32, 3)
    loader = Loader(images.contiguous(), torch.arange(10), torch.zeros(3), torch.ones(3) / 255,
                    batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 3
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == list(range(10))
    assert all(torch.allclose(x[:, 0, 0, 0], y.float(), atol=1e-4) for x, y in loader)
