"""Artefact store: every expensive result cached under data/artefacts, keyed by its full spec.

A spec is a plain dict holding everything that produced the artefact (stages.Stage.spec: the
config fields its stage reads, the key of the parent artefact, its identity such as the
trigger; STORE_VERSION). Its SHA-256
names the file; the spec is stored inside the file and compared on load, so an artefact is
reused only on an exact match. Files hold tensors and plain data only and are read with
`weights_only=True`, so a foreign file dropped into the store cannot run code. Writes go to a
temporary file that is flushed to disk and renamed into place, so an interrupted run never
leaves a half-written artefact and resumes from the last complete one; the temporary files of
killed writers are removed by the next write into the same folder. Nothing non-finite (NaN,
inf) is ever saved or loaded.
"""
import functools
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shown(path) -> str:
    """`path` relative to the repository when inside it, as printed into outputs (a committed
    notebook carries no path of the machine that ran it); elsewhere as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# Bump when a change of code changes what a cached artefact would contain. 2: keys derived
# from the stages' declared reads (stages.py); fixed-shape poisoning (triggers.poison).
STORE_VERSION = 2


class StaleCacheError(RuntimeError):
    """A cached file does not hold what its key promises (corrupt, or from other code)."""


class NonFiniteError(FloatingPointError):
    """A loss, parameter, output or result became NaN or infinite; the message says where."""


def non_finite_fields(payload, prefix="") -> list:
    """Dotted names of the float tensors and floats in a nested dict/list payload that hold
    NaN or inf (empty when all are finite)."""
    if isinstance(payload, dict):
        return [name for key, value in payload.items()
                for name in non_finite_fields(value, f"{prefix}{key}.")]
    if isinstance(payload, (list, tuple)):
        return [name for i, value in enumerate(payload)
                for name in non_finite_fields(value, f"{prefix}{i}.")]
    if isinstance(payload, torch.Tensor) and payload.is_floating_point():
        return [] if bool(torch.isfinite(payload).all()) else [prefix.rstrip(".")]
    if isinstance(payload, float) and not math.isfinite(payload):
        return [prefix.rstrip(".")]
    return []


def spec_key(spec: dict) -> str:
    """Hex SHA-256 (first 16 chars) of the canonical JSON of `spec`."""
    text = json.dumps({"store_version": STORE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(spec: dict) -> dict:
    return json.loads(json.dumps({"store_version": STORE_VERSION, **spec}, sort_keys=True,
                                 default=str))


# Temporary files are named <target>.~<pid>@<host>~<random>.tmp, so that a later writer can
# tell the leftovers of a killed process on this host from another live writer's file.
_TEMP_NAME = re.compile(r"\.~(\d+)@(.+)~[^~]*\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder) -> list:
    """Delete the temporary files in `folder` left by killed writers of this host (their
    process is gone); returns the paths removed. Files of live writers are kept."""
    removed, host = [], socket.gethostname()
    for tmp in Path(folder).glob("*.tmp"):
        match = _TEMP_NAME.search(tmp.name)
        if match and match.group(2) == host and not _process_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path, write, replace: bool = True) -> Path:
    """Call write(binary file) on a temporary file beside `path`, flush it to disk, then
    rename it into place (and flush the folder): readers never see a half-written file, an
    interrupted write leaves none behind once the next write into the folder has run.
    replace=False never replaces a file already at `path` (FileExistsError), even one another
    process put there a moment before: the temporary file is hard-linked into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp",
                               prefix=f"{path.name}.~{os.getpid()}@{socket.gethostname()}~")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)              # atomic, and fails if `path` exists
            Path(tmp).unlink()
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)        # the rename itself survives a crash
    finally:
        os.close(folder)
    return path


def write_json(path, obj, replace: bool = True) -> Path:
    """Write `obj` as indented JSON to `path`, atomically (see atomic_write)."""
    text = json.dumps(obj, indent=1, default=str).encode()
    return atomic_write(path, functools.partial(_write_bytes, text), replace)


def _write_bytes(data, f):
    f.write(data)


def _torch_save(record, file) -> None:
    """torch.save, whose zip writer reports a failed write (a full disk) as a RuntimeError
    ("PytorchStreamWriter failed writing file", "unexpected pos"): raised here as the OSError
    it is, so that Store.put keeps the built result with a warning."""
    try:
        torch.save(record, file)
    except RuntimeError as err:
        if "PytorchStreamWriter" in str(err) or "unexpected pos" in str(err):
            raise OSError(f"writing failed, the disk may be full: {err}") from err
        raise


class Store:
    """`store.get_or_build(kind, spec, build)` returns the cached payload or builds and saves it.
    Its root: `root`, else $MESA_STORE, else data/artefacts; a relative $MESA_STORE is taken
    from the repository's root, so that a notebook (run in notebooks/) and a command (run
    anywhere) given the same setting share one store."""

    def __init__(self, root=None):
        if root is None and os.environ.get("MESA_STORE"):
            root = REPO_ROOT / os.environ["MESA_STORE"]      # an absolute one stays as it is
        self.root = Path(root or REPO_ROOT / "data" / "artefacts")

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / f"{spec_key(spec)}.pt"

    def load(self, kind: str, spec: dict):
        """The payload stored for `spec`, or None when there is none."""
        path = self.path(kind, spec)
        if not path.exists():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, or a foreign file holding more than tensors
            raise StaleCacheError(f"cannot read cached {kind} {path}: {err}. Delete the file "
                                  "to rebuild it.") from err
        if not isinstance(record, dict) or record.get("spec") != _canonical(spec):
            raise StaleCacheError(f"cached {kind} {path} was made from a different spec than "
                                  "its key says (stale or foreign file). Delete it to rebuild.")
        bad = non_finite_fields(record["payload"])
        if bad:     # written before these checks existed
            raise StaleCacheError(f"cached {kind} {path} holds non-finite values in "
                                  f"{', '.join(bad[:5])}: it comes from a diverged run. "
                                  "Delete it to rebuild.")
        return record["payload"]

    def save(self, kind: str, spec: dict, payload) -> Path:
        """Write `payload` (tensors and plain data) under `spec`'s key; NaN or inf anywhere
        in it is a NonFiniteError and nothing is written."""
        bad = non_finite_fields(payload)
        if bad:
            raise NonFiniteError(f"refusing to store {kind} with non-finite values in "
                                 f"{', '.join(bad[:5])}")
        record = {"spec": _canonical(spec), "payload": payload}
        return atomic_write(self.path(kind, spec), functools.partial(_torch_save, record))

    def get_or_build(self, kind: str, spec: dict, build):
        """The stored payload of `spec`, else build() saved and returned. When saving fails
        (read-only or full disk), the built payload is still returned, with a warning."""
        payload = self.load(kind, spec)
        if payload is None:
            payload = build()
            self.put(kind, spec, payload)
        return payload

    def put(self, kind: str, spec: dict, payload) -> None:
        """save, but a failure to write (read-only or full disk) is a warning: the caller
        still has the payload, a later run builds it again."""
        try:
            self.save(kind, spec, payload)
        except OSError as err:
            warnings.warn(f"{kind} was built but NOT cached ({err}): this run uses it, a "
                          f"later run builds it again. Check that {self.root} is writable "
                          "and has space (or set MESA_STORE).", stacklevel=3)
