"""Artefact store: every expensive result cached under data/artefacts, keyed by its full spec.

A spec is a plain dict holding everything that produced the artefact (the relevant config
sections, the trigger, the seed, the key of the parent model, STORE_VERSION). Its SHA-256
names the file; the spec is stored inside the file and compared on load, so an artefact is
reused only on an exact match. Writes go to a temporary file renamed into place, so an
interrupted run never leaves a half-written artefact and resumes from the last complete one.
"""
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bump when a change of code changes what a cached artefact would contain.
STORE_VERSION = 1


class StaleCacheError(RuntimeError):
    """A cached file does not hold what its key promises (corrupt, or from other code)."""


def spec_key(spec: dict) -> str:
    """Hex SHA-256 (first 16 chars) of the canonical JSON of `spec`."""
    text = json.dumps({"store_version": STORE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(spec: dict) -> dict:
    return json.loads(json.dumps({"store_version": STORE_VERSION, **spec}, sort_keys=True,
                                 default=str))


def atomic_write(path, write) -> Path:
    """Call write(binary file) on a temporary file beside `path`, then rename it into place:
    readers never see a half-written file, and an interrupted write leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Store:
    """`store.get_or_build(kind, spec, build)` returns the cached payload or builds and saves it."""

    def __init__(self, root=None):
        root = root or os.environ.get("MESA_STORE") or REPO_ROOT / "data" / "artefacts"
        self.root = Path(root)

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / f"{spec_key(spec)}.pt"

    def load(self, kind: str, spec: dict):
        """The payload stored for `spec`, or None when there is none."""
        path = self.path(kind, spec)
        if not path.exists():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated or foreign file
            raise StaleCacheError(f"cannot read cached {kind} {path}: {err}. Delete the file "
                                  "to rebuild it.") from err
        if not isinstance(record, dict) or record.get("spec") != _canonical(spec):
            raise StaleCacheError(f"cached {kind} {path} was made from a different spec than "
                                  "its key says (stale or foreign file). Delete it to rebuild.")
        return record["payload"]

    def save(self, kind: str, spec: dict, payload) -> Path:
        record = {"spec": _canonical(spec), "payload": payload}
        return atomic_write(self.path(kind, spec), functools.partial(torch.save, record))

    def get_or_build(self, kind: str, spec: dict, build):
        payload = self.load(kind, spec)
        if payload is None:
            payload = build()
            self.save(kind, spec, payload)
        return payload
