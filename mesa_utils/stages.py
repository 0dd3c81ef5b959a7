"""The stages whose artefacts the store keeps, and how their keys are derived: one declaration
per stage, its parent and the config it reads.

An artefact's key is the hash (store.spec_key) of
    {"stage": its name, "parent": the parent artefact's key, "config": {field: value} of every
     field it reads, and its identity (the trigger, the seed of a retraining, ...)}.
A stage reads config sections ("attack": each of its fields) or single fields
("sampdetox.t1"); whatever an ancestor reads enters through the parent's key. So changing a
field changes the key of every stage whose lineage reads it and of no other, and a how-field
(config.HOW_FIELDS: where a run computes, what it keeps) enters no key at all
(tests/test_stages.py checks both, and traces what each stage's code actually reads).
Stages without a parent (the clean model, the diffusion model) take the data's fingerprint
as identity instead.
"""
import dataclasses
from dataclasses import dataclass

from .config import HOW_FIELDS, GeneratorConfig, leaf_paths, lookup
from .store import spec_key


def expand(paths) -> tuple:
    """The leaf fields (config.leaf_paths) that dotted `paths` name: a section names all of its
    own; an unknown path raises ValueError."""
    leaves = leaf_paths()
    out = []
    for path in paths:
        named = [leaf for leaf in leaves if leaf == path or leaf.startswith(path + ".")]
        if not named:
            raise ValueError(f"{path!r} names no config field (config.leaf_paths())")
        out += [leaf for leaf in named if leaf not in out]
    return tuple(out)


@dataclass(frozen=True)
class Stage:
    """A kind of stored artefact: `name` (its store folder), the stage it is made from
    (`parent`, None for a root) and the config it `reads` (sections or dotted fields)."""
    name: str
    parent: "Stage | None"
    reads: tuple

    def __post_init__(self):
        how = [leaf for leaf in self.fields if leaf in HOW_FIELDS]
        if how:
            raise ValueError(f"stage {self.name} reads how-fields {how}: they decide where a "
                             "run computes, not what, and enter no key")

    @property
    def fields(self) -> tuple:
        """The leaf fields the stage itself reads."""
        return expand(self.reads)

    @property
    def lineage(self) -> tuple:
        """The stage, its parent, its parent's parent, ... up to the root."""
        return (self,) + (self.parent.lineage if self.parent else ())

    @property
    def key_fields(self) -> frozenset:
        """Every field whose change changes this stage's keys: its own and its ancestors'."""
        return frozenset(leaf for stage in self.lineage for leaf in stage.fields)

    def spec(self, cfg, parent_key: str | None = None, **identity) -> dict:
        """The spec (store.spec_key hashes it) of this stage's artefact under `cfg`, made from
        the artefact keyed `parent_key`; `identity`: what else tells it apart (JSON values)."""
        if (parent_key is None) != (self.parent is None):
            raise ValueError(f"stage {self.name} is made from "
                             f"{self.parent.name if self.parent else 'no parent'}: "
                             f"parent_key must be {'given' if self.parent else 'None'}")
        return {"stage": self.name, "parent": parent_key,
                "config": {leaf: lookup(cfg, leaf) for leaf in self.fields}, **identity}

    def key(self, cfg, parent_key: str | None = None, **identity) -> str:
        return spec_key(self.spec(cfg, parent_key, **identity))


def _generator_fields(section: str) -> tuple:
    """The fields of a generator section (mesa, detection) that shape training; alpha and beta
    reach a bank through its members, and detection's threshold is applied to a trained bank."""
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(GeneratorConfig))


# The classifier's data and training; eval_batch_size: every metric is measured in its batches
# (on a GPU the random positions of a batch depend on its size).
CLEAN = Stage("clean", None, ("dataset", "train_subset", "test_subset", "eval_size", "width",
                              "seed", "amp", "eval_batch_size", "clean"))
# identity: trigger, attack_seed (0 the original, k > 0 a sibling attack)
BACKDOOR = Stage("backdoor", CLEAN, ("target", "trigger_set", "attack"))
BLENDED = Stage("blended", CLEAN, ("target", "attack", "blended"))
# A bank of generators against a classifier (a backdoored one, or the clean model);
# identity: members, the trigger shape.
MESA_BANK = Stage("mesa", BACKDOOR, _generator_fields("mesa"))
DETECTION_BANK = Stage("detection", BACKDOOR, _generator_fields("detection"))
# The same, size-free (notebook 09): colour and transparency over a max_size window.
SIZE_FREE = ("unknown_size.max_size", "unknown_size.transparency_cost")
FREE_MESA_BANK = Stage("mesa_free", BACKDOOR, _generator_fields("mesa") + SIZE_FREE)
FREE_DETECTION_BANK = Stage("detection_free", BACKDOOR, _generator_fields("detection") + SIZE_FREE)
# identity: hinge_beta (None: cross-entropy toward the target)
REVERSE = Stage("reverse", BACKDOOR, ("baseline",))
NEURAL_CLEANSE = Stage("neural_cleanse", BACKDOOR, ("neural_cleanse",))
# A retrained copy of a backdoored model; identity: the trigger source's spec, the seed and the
# defender's images held out. The bank size changes float rounding (config.retrain_bank).
DEFENSE = Stage("defense", BACKDOOR, ("defense", "retrain_bank"))
DIFFUSION = Stage("diffusion", None, (
    "dataset", "train_subset", "seed", "amp", "sampdetox.timesteps", "sampdetox.channels",
    "sampdetox.layers_per_block", "sampdetox.train_steps", "sampdetox.batch_size",
    "sampdetox.lr", "sampdetox.ema_decay", "sampdetox.max_train_timestep"))
# identity: the images' source spec and number
PURIFIED = Stage("purified", DIFFUSION, ("sampdetox.t1", "sampdetox.t2",
                                         "sampdetox.eval_batch_size"))

STAGES = (CLEAN, BACKDOOR, BLENDED, MESA_BANK, DETECTION_BANK, FREE_MESA_BANK,
          FREE_DETECTION_BANK, REVERSE, NEURAL_CLEANSE, DEFENSE, DIFFUSION, PURIFIED)
# by (config section, size-free)
BANK_STAGES = {("mesa", False): MESA_BANK, ("detection", False): DETECTION_BANK,
               ("mesa", True): FREE_MESA_BANK, ("detection", True): FREE_DETECTION_BANK}
