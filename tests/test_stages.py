"""Artefact and unit keys are derived from declared reads: every field moves exactly the keys
whose lineage reads it, a how-field moves none, and what each stage's code actually reads
(traced on a toy run) is in its key."""
import contextlib
import dataclasses

import pytest

from mesa_utils import config, stages
from mesa_utils.config import HOW_FIELDS, Config, leaf_paths, lookup
from mesa_utils.stages import STAGES, Stage, expand
from mesa_utils.units import KINDS, config_key

from tests.conftest import make_splits


def _with(cfg, path, value):
    """cfg with the field at dotted `path` set to `value` (not validated: keys only read)."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _with(getattr(cfg, head), rest, value)})


def _moved_by(key):
    """The leaf fields whose change changes key(cfg), over every field of the smoke profile."""
    cfg = config.make_config("smoke")
    base = key(cfg)
    return {path for path in leaf_paths()
            if key(_with(cfg, path, ("changed", lookup(cfg, path)))) != base}


def _chained_key(stage, cfg, trigger=170):
    """The key of `stage`'s artefact made from its parent's under cfg, as the code chains them
    (a root takes the data's fingerprint)."""
    if stage.parent is None:
        return stage.key(cfg, data="toy")
    return stage.key(cfg, _chained_key(stage.parent, cfg, trigger), trigger=trigger)


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_a_stage_key_changes_with_exactly_the_fields_its_lineage_reads(stage):
    moved = _moved_by(lambda cfg: _chained_key(stage, cfg))
    assert moved == stage.key_fields
    assert not moved & set(HOW_FIELDS)
    if stage.parent:        # identity tells artefacts apart too
        cfg = config.make_config("smoke")
        assert _chained_key(stage, cfg, 170) != _chained_key(stage, cfg, 186)


def test_lineages_chain_the_reads_of_the_ancestors():
    assert stages.BACKDOOR.key_fields > stages.CLEAN.key_fields
    assert stages.DEFENSE.key_fields >= stages.BACKDOOR.key_fields | {"retrain_bank"}
    assert "defense.lr" not in stages.MESA_BANK.key_fields
    assert "mesa.alpha" not in stages.MESA_BANK.key_fields     # members carry it
    assert "detection.threshold" not in stages.DETECTION_BANK.key_fields
    assert set(expand(["attack"])) == {f"attack.{f.name}"
                                       for f in dataclasses.fields(config.TrainConfig)}


def test_a_stage_refuses_a_how_field_an_unknown_path_and_a_missing_parent_key():
    with pytest.raises(ValueError, match="how-fields"):
        Stage("bad", None, ("device",))
    with pytest.raises(ValueError, match="names no config field"):
        Stage("bad", None, ("mesa.stpes",))
    with pytest.raises(ValueError, match="parent_key must be given"):
        stages.BACKDOOR.spec(config.make_config("smoke"))


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda kind: kind.name)
def test_a_unit_key_changes_with_exactly_its_fields_and_never_with_the_trigger_list(kind):
    moved = _moved_by(lambda cfg: config_key(cfg, kind))
    assert moved == kind.key_fields
    assert "triggers" not in moved and not moved & set(HOW_FIELDS)
    assert not moved & {f"study.{f.name}" for f in dataclasses.fields(config.StudyConfig)}


def test_how_fields_are_declared_on_their_fields():
    assert set(HOW_FIELDS) == {"device", "save_retrained"}
    assert config.field_metadata("retrain_bank")["how"] is False   # a bank rounds otherwise


# ---------------------------------------------------------------------------------------------
# What the code reads: every config field read while a stage or unit builds must be in its key

@contextlib.contextmanager
def config_reads(monkeypatch):
    """Record the dotted path of every config field read (a set, yielded). Sections are
    named by the attribute they were reached through (cfg.defense -> "defense."), so a
    section replaced into a new Config is still named; the reads of dataclasses.replace
    (copies) and of config.validate (checks) are not counted."""
    reads, prefixes, silenced = set(), {}, [0]

    def getattribute(self, name):
        value = object.__getattribute__(self, name)
        names = object.__getattribute__(type(self), "__dataclass_fields__")
        if name not in names:
            return value
        prefix = "" if type(self) is Config else prefixes.get(id(self), (None,))[0]
        path = (f"{prefix}{name}" if prefix is not None
                else f"<unnamed {type(self).__name__}>.{name}")
        if dataclasses.is_dataclass(value):
            prefixes[id(value)] = (path + ".", value)   # kept alive: its id is not reused
        elif not silenced[0]:
            reads.add(path)
        return value

    def quiet(fn):
        def call(*args, **kwargs):
            silenced[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                silenced[0] -= 1
        return call
    for cls in config.SECTIONS:
        monkeypatch.setattr(cls, "__getattribute__", getattribute, raising=False)
    # copying fields and checking a config (config.validate) are not computing with them
    monkeypatch.setattr(dataclasses, "replace", quiet(dataclasses.replace))
    for check in ("_check_fields", "_check_across_fields"):
        monkeypatch.setattr(config, check, quiet(getattr(config, check)))
    yield reads


def _toy_ctx(tmp_path):
    import torch
    from mesa_utils.store import Store
    from mesa_utils.train import Context
    cfg = config.make_config("smoke", device="cpu", amp="off", **{"protocols.holdout": 32})
    splits = make_splits(n=96, num_classes=10)
    labels = torch.arange(96) % 10      # every class, so that detection has images to use
    splits = dataclasses.replace(splits, train_labels=labels, defense_labels=labels,
                                 eval_labels=labels)
    return Context(cfg, splits, torch.device("cpu"), None, Store(tmp_path))


def _stage_builds():
    """Each stage's builder, given its identity (what the caller chooses from other config)."""
    from mesa_utils import defense, mesa, sampdetox, train
    from mesa_utils.triggers import TriggerPaster, trigger_from_id

    def bank(ctx, section, size_free=False):     # its members: its identity, chosen by the caller
        backdoor = train.backdoored_model(ctx, 170)
        return mesa.mesa_bank(ctx, backdoor.model(ctx), backdoor.key,
                              [mesa.Member(0.8, 0.1, 0), mesa.Member(0.5, 0.1, 1)], section,
                              size_free=size_free)

    def purified(ctx):
        diffusion = sampdetox.diffusion_model(ctx)
        sampdetox.purified_images(ctx, diffusion, ctx.splits.eval_images[:4], {"kind": "toy"})
    return {
        stages.CLEAN: lambda ctx: train.clean_model(ctx),
        stages.BACKDOOR: lambda ctx: train.backdoored_model(ctx, 170, attack_seed=1),
        stages.BLENDED: lambda ctx: train.blended_model(ctx),
        stages.MESA_BANK: lambda ctx: bank(ctx, "mesa"),
        stages.DETECTION_BANK: lambda ctx: bank(ctx, "detection"),
        stages.FREE_MESA_BANK: lambda ctx: bank(ctx, "mesa", size_free=True),
        stages.FREE_DETECTION_BANK: lambda ctx: bank(ctx, "detection", size_free=True),
        stages.REVERSE: lambda ctx: defense.baseline_triggers(
            ctx, train.backdoored_model(ctx, 170), hinge_beta=0.8),
        stages.NEURAL_CLEANSE: lambda ctx: defense.neural_cleanse_result(
            ctx, train.backdoored_model(ctx, 170)),
        stages.DEFENSE: lambda ctx: defense.retrain(
            ctx, train.backdoored_model(ctx, 170), TriggerPaster(trigger_from_id(0)),
            {"kind": "toy"}, holdout=16),
        stages.DIFFUSION: lambda ctx: sampdetox.diffusion_model(ctx),
        stages.PURIFIED: purified,
    }


def test_every_stage_is_traced():
    assert set(_stage_builds()) == set(STAGES)


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_what_a_stage_reads_while_it_builds_is_in_its_key(stage, tmp_path, monkeypatch):
    # Traced from an empty store: a field read by an ancestor's build is in the ancestor's
    # key, which this key holds through its parent; so every read must be in key_fields.
    ctx = _toy_ctx(tmp_path)
    with config_reads(monkeypatch) as reads:
        _stage_builds()[stage](ctx)
    assert reads, "nothing traced"
    assert sorted(reads - stage.key_fields - set(HOW_FIELDS)) == []


@pytest.mark.parametrize("kind", [KINDS[name] for name in
                                  ("attack", "detection", "defence", "neural_cleanse",
                                   "screen", "contrast")], ids=lambda kind: kind.name)
def test_what_a_unit_reads_while_it_computes_its_rows_is_in_its_key(kind, tmp_path,
                                                                    monkeypatch):
    ctx = _toy_ctx(tmp_path)
    with config_reads(monkeypatch) as reads:
        kind.tables(ctx, 170)
    assert sorted(reads - kind.key_fields - set(HOW_FIELDS) - set(expand(kind.sets))) == []
