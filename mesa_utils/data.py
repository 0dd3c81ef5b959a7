"""CIFAR-10/100 as uint8 tensors on the compute device, the paper's test-set split, batches.

Sources, tried in order: the decoded cache under data/<name>/ (.npy), the standard torchvision
folder (`cifar-10-batches-py` / `cifar-100-python`) under data/, an image-folder archive
(`<top>/{train,test}/<class>/*.jpg`, e.g. the shared `cifar10-jpg.tar.gz`; path from the
argument or $MESA_CIFAR10_ARCHIVE / $MESA_CIFAR100_ARCHIVE), and torchvision's download.
Decoding the 60K JPEGs takes ~20 s once; later loads take well under a second.
"""
import functools
import hashlib
import io
import json
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .store import REPO_ROOT, atomic_write

DATA_DIR = REPO_ROOT / "data"
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# Official per-channel statistics of the training sets, pixels in [0, 1].
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(RuntimeError):
    """The data set could not be found or read; the message says how to provide it."""


@dataclass
class Cifar:
    """A whole CIFAR data set. images: uint8 (N, 32, 32, 3); labels: int64 (N,)."""
    name: str
    classes: list
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def default_archives(name: str) -> list:
    """Candidate archive paths: $MESA_<NAME>_ARCHIVE, then data/, then ../shared/data/."""
    env = os.environ.get(f"MESA_{name.upper()}_ARCHIVE")
    stem = f"{name}-jpg.tar.gz"
    candidates = [DATA_DIR / stem, REPO_ROOT.parent / "shared" / "data" / stem]
    return ([Path(env)] if env else []) + candidates


def load_cifar(name: str = "cifar10", root=None, archive=None, download: bool = True) -> Cifar:
    """Load CIFAR-10 or CIFAR-100 (uint8, CPU), decoding and caching it on first use."""
    if name not in NUM_CLASSES:
        raise ValueError(f"unknown data set {name!r}; choose 'cifar10' or 'cifar100'")
    root = Path(root or DATA_DIR)
    cache = root / name
    if (cache / "classes.json").exists():
        return _load_cache(name, cache)
    arrays = None
    folder = root / TORCHVISION_FOLDERS[name]
    if folder.is_dir():
        arrays = _read_torchvision_folder(name, folder)
    if arrays is None:
        if archive is not None and not Path(archive).exists():
            raise DataError(f"archive {archive} does not exist")
        for path in [Path(archive)] if archive is not None else default_archives(name):
            if path.exists():
                arrays = _read_archive(name, path)
                break
    if arrays is None and download:
        arrays = _torchvision_download(name, root)
    if arrays is None:
        raise DataError(
            f"{name} not found. Provide it in one of three ways:\n"
            f"  1. the torchvision folder {root / TORCHVISION_FOLDERS[name]} (as made by "
            f"torchvision.datasets.{name.upper()}(root='{root}', download=True));\n"
            f"  2. an image-folder archive <top>/{{train,test}}/<class>/*.jpg, passed as "
            f"`archive=` or via the environment variable MESA_{name.upper()}_ARCHIVE "
            f"(looked for also at {', '.join(str(p) for p in default_archives(name)[-2:])});\n"
            f"  3. torchvision's automatic download (needs torchvision and internet access).")
    _save_cache(cache, *arrays)
    return _load_cache(name, cache)


def _check(name, images, labels, classes, source):
    n_classes = NUM_CLASSES[name]
    if len(classes) != n_classes:
        raise DataError(f"{source}: expected {n_classes} classes for {name}, found {len(classes)}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 images of shape (N, 32, 32, 3), got "
                        f"{images.dtype} {images.shape}")
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")


def _read_torchvision_folder(name, folder):
    """Arrays from torchvision's pickled batches."""
    try:
        if name == "cifar10":
            meta = _unpickle(folder / "batches.meta")
            classes = [c.decode() if isinstance(c, bytes) else c for c in meta[b"label_names"]]
            parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
            label_key = b"labels"
        else:
            meta = _unpickle(folder / "meta")
            classes = [c.decode() if isinstance(c, bytes) else c
                       for c in meta[b"fine_label_names"]]
            parts = {"train": ["train"], "test": ["test"]}
            label_key = b"fine_labels"
        out = []
        for split in ("train", "test"):
            batches = [_unpickle(folder / f) for f in parts[split]]
            images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
            labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
            _check(name, images, labels, classes, folder)
            out += [images, labels]
    except (OSError, KeyError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise DataError(f"torchvision folder {folder} is incomplete or corrupt ({err}); delete "
                        "it and download again") from err
    return out[0], out[1], out[2], out[3], classes


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _read_archive(name, path):
    """Arrays from an image-folder tar archive; class folders sorted give the label order."""
    from PIL import Image
    _verify_sha256(path)
    found = {"train": [], "test": []}   # (class, file name, bytes)
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if len(parts) < 3 or parts[-3] not in found:
                    continue
                found[parts[-3]].append((parts[-2], parts[-1], tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"archive {path} is corrupt or not a tar archive ({err}); replace it "
                        f"with a good copy or set MESA_{name.upper()}_ARCHIVE") from err
    if not found["train"] or not found["test"]:
        raise DataError(f"archive {path} has no <top>/train/<class>/ and <top>/test/<class>/ "
                        "image folders")
    classes = sorted({c for c, _, _ in found["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        items = sorted(found[split], key=lambda item: (item[0], item[1]))
        try:
            images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                               for _, _, data in items])
        except Exception as err:
            raise DataError(f"archive {path}: an image of the {split} split cannot be decoded "
                            f"({err})") from err
        labels = np.array([index.get(c, -1) for c, _, _ in items], dtype=np.int64)
        if (labels < 0).any():
            raise DataError(f"archive {path}: the test split has classes missing from train")
        _check(name, images, labels, classes, path)
        out += [images, labels]
    return out[0], out[1], out[2], out[3], classes


def _verify_sha256(path):
    """Check `path` against `<path>.sha256` when such a file lies beside it."""
    expected_file = Path(str(path) + ".sha256")
    if not expected_file.exists():
        return
    expected = expected_file.read_text().split()[0].lower()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DataError(f"archive {path} does not match its checksum {expected_file} "
                        "(corrupt or truncated copy); replace it with a good copy")


def _torchvision_download(name, root):
    """Download with torchvision when it imports and the network answers, else None."""
    try:
        import torchvision.datasets as tvd
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception:  # no torchvision build for this torch, or no network: try the next way
        return None
    return _read_torchvision_folder(name, root / TORCHVISION_FOLDERS[name])


def _save_cache(cache, train_x, train_y, test_x, test_y, classes):
    for stem, array in [("train_images", train_x), ("train_labels", train_y),
                        ("test_images", test_x), ("test_labels", test_y)]:
        atomic_write(cache / f"{stem}.npy", functools.partial(np.save, arr=array))
    # classes.json last: its presence marks a complete cache.
    atomic_write(cache / "classes.json", functools.partial(_write_json, classes))


def _write_json(obj, f):
    f.write(json.dumps(obj).encode())


def _load_cache(name, cache):
    try:
        classes = json.loads((cache / "classes.json").read_text())
        arrays = [np.load(cache / f"{stem}.npy") for stem in
                  ("train_images", "train_labels", "test_images", "test_labels")]
        for images, labels in (arrays[:2], arrays[2:]):
            _check(name, images, labels, classes, cache)
    except (OSError, ValueError, DataError) as err:
        raise DataError(f"decoded cache {cache} is unreadable ({err}); delete the folder to "
                        "decode the data set again") from err
    return Cifar(name, classes, *[torch.from_numpy(a) for a in arrays])


# ---------------------------------------------------------------------------------------------
# The paper's splits, on the device

@dataclass
class Splits:
    """Everything a stage needs, on one device. images: uint8 (N, 32, 32, 3); labels: int64.

    train: the training set (clean training and attack). defense: the 8K part of the test set
    that the defender owns (trigger modelling, retraining). eval: the 2K held-out part.
    """
    name: str
    classes: list
    mean: torch.Tensor      # (3,) float, for normalisation
    std: torch.Tensor       # (3,)
    train_images: torch.Tensor
    train_labels: torch.Tensor
    defense_images: torch.Tensor
    defense_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_test(n: int, eval_size: int, seed: int):
    """Seeded permutation of range(n): (defense indices (n - eval_size,), eval indices)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[eval_size:], order[:eval_size]


def _subset(n, size, seed):
    if not size or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def prepare_splits(cfg, device, cifar: Cifar | None = None) -> Splits:
    """The config's data set and its train / defense (8K) / eval (2K) splits on `device`."""
    cifar = cifar or load_cifar(cfg.dataset)
    train = _subset(len(cifar.train_images), cfg.train_subset, cfg.seed)
    test = _subset(len(cifar.test_images), cfg.test_subset, cfg.seed + 1)
    defense, held_out = split_test(len(test), cfg.eval_size, cfg.seed)
    mean, std = STATS[cfg.dataset]
    tensors = [torch.tensor(mean), torch.tensor(std),
               cifar.train_images[train], cifar.train_labels[train],
               cifar.test_images[test[defense]], cifar.test_labels[test[defense]],
               cifar.test_images[test[held_out]], cifar.test_labels[test[held_out]]]
    return Splits(cifar.name, cifar.classes, *[t.to(device) for t in tensors])


# ---------------------------------------------------------------------------------------------
# Batches: normalisation and augmentation on the device

def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W), channels-last memory, normalised."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (reflect padding `pad`) and horizontal flip, per image, in one gather."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shift = torch.randint(0, 2 * pad + 1, (b, 2), device=x.device, generator=generator)
    rows = (shift[:, :1] + torch.arange(h, device=x.device))[:, :, None]     # (B, H, 1)
    cols = (shift[:, 1:] + torch.arange(w, device=x.device))[:, None, :]     # (B, 1, W)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols]                     # (B, H, W, C)
    return crops.permute(0, 3, 1, 2)


class Loader:
    """Iterable of (normalised images (B, C, H, W), labels (B,)) from uint8 data on the device.

    `images` and `labels` are public so that a stage can subset, poison or relabel them.
    """

    def __init__(self, images, labels, mean, std, batch_size, shuffle=False, augment=False,
                 drop_last=False, seed=0):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.batch_size, self.shuffle, self.augment, self.drop_last = (
            batch_size, shuffle, augment, drop_last)
        self.generator = torch.Generator(images.device).manual_seed(seed)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.images)
        device = self.images.device
        order = (torch.randperm(n, device=device, generator=self.generator) if self.shuffle
                 else torch.arange(n, device=device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = normalize(self.images[idx], self.mean, self.std)
            if self.augment:
                x = augment(x, self.generator)
            yield x, self.labels[idx]
