"""The artefact store: keys change with every hyperparameter, writes are atomic, stale files
are refused with a clear error."""
import dataclasses
import json

import pytest
import torch

from mesa_utils.defense import retrain
from mesa_utils.mesa import Member, bank_spec
from mesa_utils.store import REPO_ROOT, StaleCacheError, Store, shown, spec_key
from mesa_utils.train import Backdoor, backdoor_spec, clean_spec


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return value + value[-1:] if value else (1,)
    raise TypeError(value)


def _variants(obj):
    """(field name, obj with that one field changed) for every leaf field of a dataclass."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            for name, inner in _variants(value):
                yield f"{field.name}.{name}", dataclasses.replace(obj, **{field.name: inner})
        else:
            yield field.name, dataclasses.replace(obj, **{field.name: _changed(value)})


# Which config fields move which key: tests/test_stages.py, for every stage and field.

def test_clean_and_backdoor_keys_change_with_the_data_fingerprint(toy_ctx):
    other = dataclasses.replace(toy_ctx, splits=dataclasses.replace(toy_ctx.splits,
                                                                    fingerprint="other"))
    assert spec_key(clean_spec(other)) != spec_key(clean_spec(toy_ctx))
    assert spec_key(backdoor_spec(other, 170)) != spec_key(backdoor_spec(toy_ctx, 170))


def test_bank_key_changes_with_its_members_parent_and_section(toy_ctx):
    members = [Member(0.8, 0.1, 0)]
    base = spec_key(bank_spec(toy_ctx, "parent", members))
    assert spec_key(bank_spec(toy_ctx, "other", members)) != base
    assert spec_key(bank_spec(toy_ctx, "parent", [Member(0.9, 0.1, 0)])) != base
    assert spec_key(bank_spec(toy_ctx, "parent", [Member(0.8, 0.1, 0, seed=1)])) != base
    assert spec_key(bank_spec(toy_ctx, "parent", members, "detection")) != base


def test_defense_key_changes_with_every_retraining_hyperparameter(toy_ctx, monkeypatch):
    seen = []

    def record_key(self, kind, spec):       # as if stored: nothing is trained
        seen.append(spec_key(spec))
        return {}
    monkeypatch.setattr(Store, "load", record_key)
    backdoor = Backdoor(170, 0, "parent", {})
    retrain(toy_ctx, backdoor, None, {"kind": "x"})
    for name, defense in _variants(toy_ctx.cfg.defense):
        retrain(dataclasses.replace(toy_ctx, cfg=dataclasses.replace(toy_ctx.cfg, defense=defense)),
                backdoor, None, {"kind": "x"})
    retrain(toy_ctx, backdoor, None, {"kind": "y"})
    retrain(toy_ctx, backdoor, None, {"kind": "x"}, seed=5)
    retrain(toy_ctx, Backdoor(170, 0, "other parent", {}), None, {"kind": "x"})
    assert len(set(seen)) == len(seen)


def test_get_or_build_builds_once_and_writes_atomically(tmp_path):
    store = Store(tmp_path)
    calls = []
    spec = {"stage": "demo", "a": 1}

    def build():
        calls.append(1)
        return {"value": torch.arange(3)}
    first = store.get_or_build("demo", spec, build)
    second = store.get_or_build("demo", spec, build)
    assert calls == [1] and torch.equal(first["value"], second["value"])
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [f"{spec_key(spec)}.pt"]
    assert store.load("demo", {"stage": "demo", "a": 2}) is None


def test_failed_build_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)

    def build():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        store.get_or_build("demo", {"x": 1}, build)
    assert not (tmp_path / "demo").exists() or not list((tmp_path / "demo").iterdir())


def test_corrupt_artefact_is_a_clear_error(tmp_path):
    store = Store(tmp_path)
    spec = {"stage": "demo"}
    store.save("demo", spec, {"v": 1})
    store.path("demo", spec).write_bytes(b"truncated")
    with pytest.raises(StaleCacheError, match="Delete the file"):
        store.load("demo", spec)


def test_artefact_from_another_spec_is_refused(tmp_path):
    store = Store(tmp_path)
    store.save("demo", {"stage": "a"}, {"v": 1})
    store.path("demo", {"stage": "a"}).rename(store.path("demo", {"stage": "b"}))
    with pytest.raises(StaleCacheError, match="different spec"):
        store.load("demo", {"stage": "b"})


def test_a_write_that_must_not_replace_refuses_an_existing_file_and_leaves_no_temporary(tmp_path):
    from mesa_utils.store import write_json
    path = write_json(tmp_path / "unit.json", {"first": 1}, replace=False)
    with pytest.raises(FileExistsError):
        write_json(path, {"second": 2}, replace=False)
    assert json.loads(path.read_text()) == {"first": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["unit.json"]
    write_json(path, {"third": 3})                          # the default replaces
    assert json.loads(path.read_text()) == {"third": 3}


def test_a_relative_store_setting_means_one_folder_wherever_the_code_runs(tmp_path, monkeypatch):
    from mesa_utils.store import REPO_ROOT
    monkeypatch.setenv("MESA_STORE", "data/other-store")
    for where in (tmp_path, REPO_ROOT / "notebooks"):       # a command's folder, a notebook's
        monkeypatch.chdir(where)
        assert Store().root == REPO_ROOT / "data" / "other-store"
    monkeypatch.setenv("MESA_STORE", str(tmp_path / "abs"))
    assert Store().root == tmp_path / "abs"
    assert Store(tmp_path / "given").root == tmp_path / "given"


def test_paths_are_shown_relative_to_the_repository_and_others_as_given(tmp_path):
    assert shown(REPO_ROOT / "figures" / "quick") == "figures/quick"
    assert shown(REPO_ROOT / "notebooks" / ".." / "data") == "data"
    assert shown(tmp_path / "x") == str(tmp_path / "x")
