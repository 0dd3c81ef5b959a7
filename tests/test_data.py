"""Data loading from each source on tiny generated stand-ins, splits and batches."""
import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mesa_utils import data as data_module
from mesa_utils.data import (STATS, DataError, Loader, augment, content_fingerprint,
                             load_cifar, split_test, to_pixels)

RNG = np.random.default_rng(0)
# (train, test) images per class of the generated stand-ins.
STAND_IN_PER_CLASS = {"cifar10": (2, 2), "cifar100": (1, 1)}


@pytest.fixture(autouse=True)
def stand_in_data(monkeypatch):
    """Expect the stand-ins' per-class counts, and no archive named by the environment."""
    monkeypatch.setattr(data_module, "EXPECTED_PER_CLASS", STAND_IN_PER_CLASS)
    for variable in ("MESA_CIFAR10_ARCHIVE", "MESA_CIFAR100_ARCHIVE"):
        monkeypatch.delenv(variable, raising=False)


def _write_torchvision_cifar(root, name):
    """A tiny stand-in in torchvision's pickled layout, balanced labels in random order;
    returns the arrays written."""
    n_classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    per_train, per_test = STAND_IN_PER_CLASS[name]
    train_y = RNG.permutation(np.repeat(np.arange(n_classes), per_train)).tolist()
    test_y = RNG.permutation(np.repeat(np.arange(n_classes), per_test)).tolist()
    n_train = len(train_y)
    train_x = RNG.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    test_x = RNG.integers(0, 256, (len(test_y), 3072), dtype=np.uint8)

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
    assert data.train_images.shape == (len(train_y), 32, 32, 3)
    assert data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (len(test_y), 32, 32, 3)
    assert data.train_labels.tolist() == train_y and data.test_labels.tolist() == test_y
    assert len(data.classes) == (10 if name == "cifar10" else 100)
    # channel-major rows of 3072 bytes become (H, W, C)
    assert torch.equal(data.train_images[0, :, :, 1].flatten(),
                       torch.from_numpy(train_x[0, 1024:2048]))
    assert (tmp_path / name / "meta.json").exists()
    (tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
     / ("test_batch" if name == "cifar10" else "test")).unlink()
    again = load_cifar(name, root=tmp_path, download=False)     # served from the .npy cache
    assert torch.equal(again.train_images, data.train_images)


def _write_archive(path, classes=("airplane", "bird", "cat"), per_class=2, test_classes=None):
    """Random PNGs, `per_class` per class folder; the test split has `test_classes` if given."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c in (test_classes if split == "test" and test_classes else classes):
                for k in range(per_class):
                    buffer = io.BytesIO()
                    pixels = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"top/{split}/{c}/{k:04d}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


TEN = [f"class{i}" for i in range(10)]


def _ten_class_archive(tmp_path, stem="ten"):
    path = tmp_path / f"{stem}.tar.gz"
    _write_archive(path, classes=TEN)
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


def test_cache_records_source_counts_and_fingerprint(tmp_path):
    path = _ten_class_archive(tmp_path)
    data = load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    meta = json.loads((tmp_path / "cache" / "cifar10" / "meta.json").read_text())
    assert meta["source"] == {"kind": "archive", "path": str(path),
                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert meta["classes"] == TEN and meta["counts"] == {"train": [2] * 10, "test": [2] * 10}
    arrays = [data.train_images, data.train_labels, data.test_images, data.test_labels]
    assert meta["fingerprint"] == data.fingerprint == content_fingerprint(
        TEN, [a.numpy() for a in arrays])


def test_test_split_lacking_a_class_is_refused_and_not_cached(tmp_path):
    path = tmp_path / "nine.tar.gz"
    _write_archive(path, classes=TEN, test_classes=TEN[:9])
    with pytest.raises(DataError, match="test split: class 9 'class9' has 0 images, expected 2; "
                                        "replace the archive"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    assert not (tmp_path / "cache" / "cifar10").exists()


def test_named_archive_replaces_a_cache_made_from_another(tmp_path, monkeypatch, capsys):
    a, b = _ten_class_archive(tmp_path, "a"), _ten_class_archive(tmp_path, "b")
    only_b = load_cifar("cifar10", root=tmp_path / "b", archive=b, download=False)
    from_a = load_cifar("cifar10", root=tmp_path / "cache", archive=a, download=False)
    data = load_cifar("cifar10", root=tmp_path / "cache", archive=b, download=False)
    assert "replace" in capsys.readouterr().out
    assert torch.equal(data.train_images, only_b.train_images)
    assert data.fingerprint == only_b.fingerprint
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", str(a))
    again = load_cifar("cifar10", root=tmp_path / "cache", download=False)
    assert torch.equal(again.train_images, from_a.train_images)


def test_a_cache_from_a_named_archive_is_refused_when_no_archive_is_named(tmp_path, monkeypatch):
    path = _ten_class_archive(tmp_path, "modified")
    named = load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    with pytest.raises(DataError, match=r"decoded from the archive .*modified.*set "
                                        r"\$MESA_CIFAR10_ARCHIVE to it again.*or delete"):
        load_cifar("cifar10", root=tmp_path / "cache", download=False)
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", str(path))        # named again: its data
    assert load_cifar("cifar10", root=tmp_path / "cache", download=False).fingerprint == (
        named.fingerprint)
    monkeypatch.delenv("MESA_CIFAR10_ARCHIVE")
    monkeypatch.setattr(data_module, "default_archives", lambda name: [path])
    assert load_cifar("cifar10", root=tmp_path / "cache", download=False).fingerprint == (
        named.fingerprint)                     # an archive a run without a name finds: used


def test_named_archive_replaces_a_cache_from_the_torchvision_folder(tmp_path):
    _write_torchvision_cifar(tmp_path, "cifar10")
    load_cifar("cifar10", root=tmp_path, download=False)
    data = load_cifar("cifar10", root=tmp_path, archive=_ten_class_archive(tmp_path),
                      download=False)
    assert data.classes == TEN


def test_cache_from_the_named_archive_is_not_decoded_again(tmp_path, monkeypatch):
    path = _ten_class_archive(tmp_path)
    first = load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)

    def fail(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr(data_module, "_read_archive", fail)
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(path.read_bytes())
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", str(copy))    # same bytes elsewhere
    for named in (path, None):
        again = load_cifar("cifar10", root=tmp_path / "cache", archive=named, download=False)
        assert torch.equal(again.train_images, first.train_images)
        assert again.fingerprint == first.fingerprint


def test_missing_archive_named_by_environment_is_an_error(tmp_path, monkeypatch):
    _write_torchvision_cifar(tmp_path, "cifar10")      # a source that must not be used instead
    absent = tmp_path / "absent.tar.gz"
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", str(absent))
    with pytest.raises(DataError) as err:
        load_cifar("cifar10", root=tmp_path, download=False)
    assert str(err.value).startswith(
        f"$MESA_CIFAR10_ARCHIVE names the archive {absent}, which does not exist")


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


def test_no_source_names_the_three_ways(tmp_path):
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


def test_changed_cache_is_refused(tmp_path):
    _write_torchvision_cifar(tmp_path, "cifar10")
    load_cifar("cifar10", root=tmp_path, download=False)
    images = np.load(tmp_path / "cifar10" / "test_images.npy")
    images[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "cifar10" / "test_images.npy", images)
    with pytest.raises(DataError, match="do not match the fingerprint.*delete the folder"):
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


def test_to_pixels_is_channels_last_in_the_unit_range():
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    images[1, 4, 5] = torch.tensor([255, 51, 0], dtype=torch.uint8)
    x = to_pixels(images)
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[1, :, 4, 5], torch.tensor([1.0, 0.2, 0.0]))
    assert x.sum() == pytest.approx(1.2)


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
    loader = Loader(images.contiguous(), torch.arange(10), batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 3
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == list(range(10))
    assert all(torch.allclose(x[:, 0, 0, 0] * 255, y.float(), atol=1e-4) for x, y in loader)


def _archive_with(path, damaged: bytes):
    """The ten-class archive with test/class3/0001.png replaced by `damaged` bytes."""
    _write_archive(path, classes=TEN)
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members:
            data = damaged if member.name == "top/test/class3/0001.png" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def _png(height, width):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("damaged, message", [
    (_png(32, 32)[:40], r"test/class3/0001.png cannot be decoded as an image"),     # truncated
    (b"not an image at all", r"test/class3/0001.png cannot be decoded as an image"),
    (_png(28, 28), r"test/class3/0001.png is 28x28 pixels, not CIFAR's 32x32"),
])
def test_a_bad_image_in_an_archive_is_named(tmp_path, damaged, message):
    path = _archive_with(tmp_path / "bad.tar.gz", damaged)
    with pytest.raises(DataError, match=message):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    assert not (tmp_path / "cache" / "cifar10").exists()


def test_an_archive_that_is_a_folder_or_has_an_empty_checksum_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="which is a folder, not an archive file"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=tmp_path, download=False)
    path = _ten_class_archive(tmp_path)
    (tmp_path / "ten.tar.gz.sha256").write_text("")
    with pytest.raises(DataError, match=r"ten.tar.gz.sha256 holds no SHA-256 .*sha256sum"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_a_cache_whose_source_is_no_record_is_refused(tmp_path):
    path = _ten_class_archive(tmp_path)
    load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)
    meta_path = tmp_path / "cache" / "cifar10" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "source": "somewhere"}))
    with pytest.raises(DataError, match="source is 'somewhere', not a record of one; delete"):
        load_cifar("cifar10", root=tmp_path / "cache", archive=path, download=False)


def test_a_relative_archive_in_the_environment_is_taken_from_the_repository(tmp_path,
                                                                             monkeypatch):
    _ten_class_archive(tmp_path)
    monkeypatch.setattr(data_module, "REPO_ROOT", tmp_path)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")                  # where a kernel runs
    monkeypatch.setenv("MESA_CIFAR10_ARCHIVE", "ten.tar.gz")
    assert load_cifar("cifar10", root=tmp_path / "cache", download=False).classes == TEN
