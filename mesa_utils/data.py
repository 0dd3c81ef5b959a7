"""CIFAR-10/100 as uint8 tensors on the compute device, the paper's test-set split, batches.

Sources: an image-folder archive (`<top>/{train,test}/<class>/*.jpg`, e.g. the shared
`cifar10-jpg.tar.gz`) named by the `archive` argument or $MESA_CIFAR10_ARCHIVE /
$MESA_CIFAR100_ARCHIVE wins over everything else. Otherwise, in order: the decoded cache under
data/<name>/ (.npy), the standard torchvision folder (`cifar-10-batches-py` /
`cifar-100-python`) under data/, an archive at data/ or ../shared/data/, torchvision's download.
Every source must hold the official number of images per class in both splits.

The cache's meta.json records its source (an archive with its SHA-256), the per-class counts
and a fingerprint of its content: a cache made from another source than the named archive is
replaced, one whose arrays no longer match the fingerprint is refused, and the fingerprint
enters every artefact key (through the clean model's). Decoding the 60K JPEGs takes ~20 s
once; later loads take well under a second.
"""
import functools
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .store import REPO_ROOT, atomic_write, write_json

DATA_DIR = REPO_ROOT / "data"
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# Official (train, test) images per class.
EXPECTED_PER_CLASS = {"cifar10": (5000, 1000), "cifar100": (500, 100)}
# Official per-channel statistics of the training sets, pixels in [0, 1]: the classifier's
# first step (models.ResNet18) and nowhere else; everything outside it works in pixel space.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
META = "meta.json"      # written last: its presence marks a complete cache


class DataError(RuntimeError):
    """The data set could not be found or read; the message says how to provide it."""


@dataclass
class Cifar:
    """A whole CIFAR data set. images: uint8 (N, 32, 32, 3); labels: int64 (N,).

    fingerprint: hex SHA-256 of the arrays and class names (see `content_fingerprint`).
    """
    name: str
    classes: list
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: str


def default_archives(name: str) -> list:
    """Where an archive is looked for when none is named: data/, then ../shared/data/."""
    stem = f"{name}-jpg.tar.gz"
    return [DATA_DIR / stem, REPO_ROOT.parent / "shared" / "data" / stem]


def load_cifar(name: str = "cifar10", root=None, archive=None, download: bool = True) -> Cifar:
    """Load CIFAR-10 or CIFAR-100 (uint8, CPU), decoding and caching it on first use.

    A named archive (`archive`, else $MESA_<NAME>_ARCHIVE) must exist; a cache made from
    anything else is replaced by its decoded content. A cache decoded from a named archive that
    is none of the default sources is refused by a run naming none (it would use that data
    without being told).
    """
    if name not in NUM_CLASSES:
        raise ValueError(f"unknown data set {name!r}; choose 'cifar10' or 'cifar100'")
    root = Path(root or DATA_DIR)
    cache = root / name
    named = _named_archive(name, archive)
    source = _archive_source(named) if named is not None else None
    meta = _read_meta(cache)
    if meta is not None and source is None and not _found_unnamed(name, meta["source"]):
        variable = f"MESA_{name.upper()}_ARCHIVE"
        raise DataError(f"the cache {cache} was decoded from {_describe(meta['source'])}, which "
                        f"was named (archive= or ${variable}) and is none of the sources found "
                        f"without a name: set ${variable} to it again to use that data, or "
                        f"delete {cache} to decode the default source")
    if meta is not None and (source is None or meta["source"].get("sha256") == source["sha256"]):
        return _load_cache(name, cache, meta)
    if meta is not None:
        print(f"{name}: the cache {cache} was made from {_describe(meta['source'])}; decoding "
              f"{named} to replace it")
    source = source or _find_source(name, root, download)
    classes, arrays = _read_source(name, source)
    return _save_cache(name, cache, source, classes, arrays)


def content_fingerprint(classes: list, arrays) -> str:
    """Hex SHA-256 of the class names and of the arrays' dtypes, shapes and bytes.

    ~0.15 s for CIFAR-10's 184 MB: SHA-256 ran twice as fast as BLAKE2b here (a CPU with SHA
    instructions), and a cached load stays ~0.2 s.
    """
    header = json.dumps([classes, [(a.dtype.str, a.shape) for a in arrays]])
    digest = hashlib.sha256(header.encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _named_archive(name, archive):
    """The archive named by `archive`, else by $MESA_<NAME>_ARCHIVE, else None. A named path
    that does not exist is an error: falling back to another copy would hide the mistake."""
    variable = f"MESA_{name.upper()}_ARCHIVE"
    if archive is not None:
        path, named_by, fix = archive, "archive=", "correct the argument"
    else:
        path, named_by, fix = os.environ.get(variable), f"${variable}", "correct or unset it"
    if not path:
        return None
    if archive is None and not Path(path).is_absolute():
        # the same file for every process: notebook kernels run in notebooks/, commands at
        # the repository's root (as a relative MESA_STORE)
        path = REPO_ROOT / path
    if not Path(path).exists():
        raise DataError(f"{named_by} names the archive {path}, which does not exist; {fix} "
                        "(no other copy is used in its place)")
    if not Path(path).is_file():
        raise DataError(f"{named_by} names {path}, which is a folder, not an archive file "
                        f"(<top>/{{train,test}}/<class>/*.jpg packed as .tar.gz); {fix}")
    return Path(path)


def _found_unnamed(name, source) -> bool:
    """Whether a run naming no archive could have found `source` (a cache's meta source): the
    torchvision folder or download, or an archive at one of default_archives. A cache decoded
    from an archive named elsewhere holds data that such a run did not ask for."""
    if source.get("kind") != "archive":
        return True
    defaults = {str(path.resolve()) for path in default_archives(name)}
    return str(Path(source["path"]).resolve()) in defaults


def _find_source(name, root, download):
    """The first source present when no archive is named: the torchvision folder, an archive
    at a default place, torchvision's download; else a DataError naming the three ways."""
    folder = root / TORCHVISION_FOLDERS[name]
    if folder.is_dir():
        return {"kind": "torchvision folder", "path": str(folder)}
    for path in default_archives(name):
        if path.exists():
            return _archive_source(path)
    if download and _torchvision_download(name, root):
        return {"kind": "torchvision download", "path": str(folder)}
    raise DataError(
        f"{name} not found. Provide it in one of three ways:\n"
        f"  1. the torchvision folder {folder} (as made by "
        f"torchvision.datasets.{name.upper()}(root='{root}', download=True));\n"
        f"  2. an image-folder archive <top>/{{train,test}}/<class>/*.jpg, passed as "
        f"`archive=` or via the environment variable MESA_{name.upper()}_ARCHIVE "
        f"(looked for also at {', '.join(str(p) for p in default_archives(name))});\n"
        f"  3. torchvision's automatic download (needs torchvision and internet access).")


def _describe(source):
    return f"the {source['kind']} {source['path']}"


def _read_source(name, source):
    """(classes, [train images, train labels, test images, test labels]) of a checked source."""
    archive = source["kind"] == "archive"
    read = _read_archive if archive else _read_torchvision_folder
    classes, arrays = read(name, Path(source["path"]))
    try:
        _check(name, classes, arrays)
    except DataError as err:
        fix = ("replace the archive with a complete copy" if archive
               else "delete the folder and download it again")
        raise DataError(f"{_describe(source)}: {err}; {fix} (nothing was cached)") from None
    return classes, arrays


def _check(name, classes, arrays):
    """Raise DataError unless `arrays` hold `name` complete: its number of classes, uint8
    (N, 32, 32, 3) images with one label each, the official number of images per class."""
    n_classes = NUM_CLASSES[name]
    if len(classes) != n_classes:
        raise DataError(f"expected {n_classes} classes for {name}, found {len(classes)}")
    for split, images, labels, expected in zip(SPLITS, arrays[0::2], arrays[1::2],
                                               EXPECTED_PER_CLASS[name]):
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
            raise DataError(f"{split} split: expected uint8 images of shape (N, 32, 32, 3), got "
                            f"{images.dtype} {images.shape}")
        if labels.shape != (len(images),) or not ((labels >= 0) & (labels < n_classes)).all():
            raise DataError(f"{split} split: {len(images)} images need as many labels in "
                            f"0..{n_classes - 1}, got {labels.shape} labels")
        counts = np.bincount(labels, minlength=n_classes)
        wrong = [f"class {c} {classes[c]!r} has {counts[c]} images"
                 for c in np.flatnonzero(counts != expected)]
        if wrong:
            more = f", and {len(wrong) - 10} more classes" if len(wrong) > 10 else ""
            raise DataError(f"{split} split: {', '.join(wrong[:10])}{more}, expected {expected}")


def _read_torchvision_folder(name, folder):
    """(classes, arrays) from torchvision's pickled batches."""
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
        arrays = []
        for split in SPLITS:
            batches = [_unpickle(folder / f) for f in parts[split]]
            images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
            labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
            arrays += [images, labels]
    except (OSError, KeyError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise DataError(f"torchvision folder {folder} is incomplete or corrupt ({err}); delete "
                        "it and download again") from err
    return classes, arrays


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _archive_source(path):
    """{'kind': 'archive', 'path', 'sha256'}, the digest checked against `<path>.sha256` when
    such a file lies beside the archive (~0.02 s for the 19 MB CIFAR-10 archive)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    expected_file = Path(str(path) + ".sha256")
    expected = expected_file.read_text().split()[:1] if expected_file.exists() else None
    if expected is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", "".join(expected)):
        raise DataError(f"checksum file {expected_file} holds no SHA-256 (64 hex digits first); "
                        f"write the archive's (sha256sum {Path(path).name}) or delete the file")
    if expected is not None and expected[0].lower() != sha256:
        raise DataError(f"archive {path} does not match its checksum {expected_file} "
                        "(corrupt or truncated copy); replace it with a good copy")
    return {"kind": "archive", "path": str(path), "sha256": sha256}


def _read_archive(name, path):
    """(classes, arrays) from an image-folder tar archive; sorted class folders give the labels."""
    from PIL import Image
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
    arrays = []
    for split in SPLITS:
        items = sorted(found[split], key=lambda item: (item[0], item[1]))
        decoded = []
        for folder, file, data in items:
            where = f"archive {path}: {split}/{folder}/{file}"
            try:
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception as err:    # PIL raises several kinds for truncated or foreign files
                raise DataError(f"{where} cannot be decoded as an image ({err}); replace the "
                                "archive with a good copy") from err
            if image.shape != (32, 32, 3):
                raise DataError(f"{where} is {image.shape[1]}x{image.shape[0]} pixels, not "
                                f"CIFAR's 32x32; replace the archive with a good copy")
            decoded.append(image)
        images = np.stack(decoded)
        labels = np.array([index.get(c, -1) for c, _, _ in items], dtype=np.int64)
        if (labels < 0).any():
            raise DataError(f"archive {path}: the test split has classes missing from train")
        arrays += [images, labels]
    return classes, arrays


def _torchvision_download(name, root) -> bool:
    """Download with torchvision into `root`; False when it does not import or the network
    does not answer."""
    try:
        import torchvision.datasets as tvd
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        cls(root=str(root), train=True, download=True)
        cls(root=str(root), train=False, download=True)
    except Exception:  # no torchvision build for this torch, or no network: try the next way
        return False
    return True


def _save_cache(name, cache, source, classes, arrays) -> Cifar:
    """Write the arrays, then meta.json. An older meta.json goes first, so that an interrupted
    replacement leaves an incomplete cache (decoded again), never a mismatched one."""
    (cache / META).unlink(missing_ok=True)
    for stem, array in zip(ARRAYS, arrays):
        atomic_write(cache / f"{stem}.npy", functools.partial(np.save, arr=array))
    meta = {"classes": classes, "source": source,
            "counts": {split: np.bincount(labels, minlength=len(classes)).tolist()
                       for split, labels in zip(SPLITS, arrays[1::2])},
            "fingerprint": content_fingerprint(classes, arrays)}
    write_json(cache / META, meta)
    return _cifar(name, meta, arrays)


def _untrusted(cache, reason):
    return DataError(f"decoded cache {cache} cannot be trusted: {reason}; delete the folder to "
                     "decode the data set again")


def _read_meta(cache):
    """The cache's meta.json as a dict, or None when there is no complete cache."""
    path = cache / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _untrusted(cache, f"unreadable {META} ({err})") from err
    if not isinstance(meta, dict) or not {"classes", "source", "fingerprint"} <= meta.keys():
        raise _untrusted(cache, f"{META} lacks the classes, source or fingerprint")
    if not isinstance(meta["source"], dict) or "kind" not in meta["source"]:
        raise _untrusted(cache, f"{META}'s source is {meta['source']!r}, not a record of one")
    return meta


def _load_cache(name, cache, meta) -> Cifar:
    """The cached arrays, refused unless they match the fingerprint and pass `_check`."""
    try:
        arrays = [np.load(cache / f"{stem}.npy") for stem in ARRAYS]
    except (OSError, ValueError) as err:
        raise _untrusted(cache, f"unreadable arrays ({err})") from err
    if content_fingerprint(meta["classes"], arrays) != meta["fingerprint"]:
        raise _untrusted(cache, f"its arrays do not match the fingerprint in {META} (changed "
                                "or corrupted since they were written)")
    try:
        _check(name, meta["classes"], arrays)
    except DataError as err:
        raise _untrusted(cache, err) from err
    return _cifar(name, meta, arrays)


def _cifar(name, meta, arrays):
    return Cifar(name, meta["classes"], *[torch.from_numpy(a) for a in arrays],
                 meta["fingerprint"])


# ---------------------------------------------------------------------------------------------
# The paper's splits, on the device

@dataclass
class Splits:
    """Everything a stage needs, on one device. images: uint8 (N, 32, 32, 3); labels: int64.

    train: the training set (clean training and attack). defense: the 8K part of the test set
    that the defender owns (trigger modelling, retraining). eval: the 2K held-out part.
    fingerprint: `Cifar.fingerprint` of the data set they were cut from ('' for data made in
    code); it enters the clean model's key, and through it every artefact's.
    """
    name: str
    classes: list
    train_images: torch.Tensor
    train_labels: torch.Tensor
    defense_images: torch.Tensor
    defense_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    fingerprint: str = ""

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
    tensors = [cifar.train_images[train], cifar.train_labels[train],
               cifar.test_images[test[defense]], cifar.test_labels[test[defense]],
               cifar.test_images[test[held_out]], cifar.test_labels[test[held_out]]]
    return Splits(cifar.name, cifar.classes, *[t.to(device) for t in tensors],
                  fingerprint=cifar.fingerprint)


# ---------------------------------------------------------------------------------------------
# Batches: pixels and augmentation on the device

def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1], channels-last memory. Triggers are
    pasted on these; the classifier normalises them itself (models.ResNet18)."""
    return images.permute(0, 3, 1, 2).float().div_(255)


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
    """Iterable of (pixels (B, C, H, W) in [0, 1], labels (B,)) from uint8 data on the device.

    `images` and `labels` are public so that a stage can subset, poison or relabel them.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, augment=False,
                 drop_last=False, seed=0):
        self.images, self.labels = images, labels
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
            x = to_pixels(self.images[idx])
            if self.augment:
                x = augment(x, self.generator)
            yield x, self.labels[idx]
