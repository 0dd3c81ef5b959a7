"""Per-trigger units: the rows of notebooks 01, 02 and 04 for one trigger, as pieces of work
whose output is small and tidy; notebooks 07 and 08 add kinds of their own.

Each kind of unit is one stage of the pipeline for one trigger id: the attack (01's rows), target
detection (02's), the defence (04's: the MESA staircase and every retraining of the comparison)
and Neural Cleanse (04's table, when one of its methods is compared). The notebooks run their
kind's pending units and read the merged tables, so a table is computed in one way only,
whether its units ran in the notebook's process, as Ray tasks (sweep.py) or on a lent machine
(timeboxed.py). Each stage is cached in the artefact store, so an interrupted unit resumes
where it stopped and a later kind reuses what an earlier one built (the backdoored model).
A unit's result is its rows, written atomically as one JSON file per trigger:

    figures/<outputs>/<kind's folder>/unit_<trigger>.json
        {"trigger", "kind", "config" (the run's complete config), "config_key", "commit",
         "uncommitted_changes", "finished", "seconds", "tables": {table: [row, ...]}}

`merge_units` concatenates the files of one config into one DataFrame per table. A unit file
already there is a finished unit (skipped by `pending_triggers`); one written under another
config is never overwritten: the run stops and names it. "pipeline" names the kinds of
notebooks 01-04 together (pipeline_kinds), run trigger by trigger.
"""
import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from . import stages
from .config import lookup, make_config, to_dict
from .data import load_cifar
from .defense import compare_defenses, neural_cleanse_row
from .mesa import detect_target, staircase_bank
from .outputs import code_version, output_folder
from .protocols import exposure_rows, repeat_triggers, screen_rows, screen_triggers
from .store import REPO_ROOT, shown, spec_key, write_json
from .train import attack_table, backdoored_model, clean_model, progress, setup

def config_key(cfg, kind) -> str:
    """The hash of everything a unit's rows depend on (UnitKind.key_fields: the config its
    stages and their ancestors read, and its own reads) and of its kind. Which triggers a run
    lists is not among them (a unit is one trigger), so the units of one profile run in
    several batches of triggers merge, and nor is a how-field (config.HOW_FIELDS)."""
    return spec_key({"unit_kind": kind.name,
                     "config": {leaf: lookup(cfg, leaf) for leaf in sorted(kind.key_fields)}})


def unit_folder(cfg, outputs: str | None = None, root=None, *, kind) -> Path:
    """Where the unit files of `cfg` go: figures/<profile or outputs>/<kind's folder>/."""
    return Path(root or REPO_ROOT / "figures") / output_folder(cfg, outputs) / kind.folder


def unit_path(folder: Path, trigger: int) -> Path:
    return Path(folder) / f"unit_{trigger}.json"


@dataclass(frozen=True)
class UnitKind:
    """What a kind of unit computes for one trigger: `tables(ctx, trigger)` -> {table: rows},
    over the triggers `triggers(cfg)`, written into figures/<outputs>/<folder>/. Its rows
    depend on the artefacts of `stages` (stages.Stage: the config they and their ancestors
    read), on the config it `reads` itself (sections or dotted fields, e.g. the methods it
    compares) and on none of the fields in `sets`: those it sets itself (the screens retrain
    at protocols.screen_rate, not at defense.poison_rate) or that list units, not make rows."""
    name: str
    folder: str
    table_names: tuple
    tables: Callable
    triggers: Callable
    stages: tuple
    reads: tuple = ()
    sets: tuple = ()

    @property
    def key_fields(self) -> frozenset:
        fields = set(stages.expand(self.reads)).union(*(s.key_fields for s in self.stages))
        return frozenset(fields - set(stages.expand(self.sets)))


def _run_triggers(cfg):
    return cfg.triggers


ATTACK = UnitKind("attack", "units/attack", ("attack",),
                  lambda ctx, trigger: {"attack": attack_table(
                      ctx, [backdoored_model(ctx, trigger)]).to_dict("records")},
                  _run_triggers, (stages.BACKDOOR,))
# detection: its members' alpha and beta, and the threshold that flags a class
DETECTION = UnitKind("detection", "units/detection", ("detection",),
                     lambda ctx, trigger: {"detection": detect_target(
                         ctx, backdoored_model(ctx, trigger))},
                     _run_triggers, (stages.DETECTION_BANK,), reads=("detection",))


def _defence_tables(ctx, trigger: int) -> dict:
    """04's rows of one trigger: its staircase's sub-models evaluated and every retraining of
    cfg.defense_methods."""
    backdoor = backdoored_model(ctx, trigger)
    return {"staircase": [{"trigger": trigger, **row}
                          for row in staircase_bank(ctx, backdoor).evaluation],
            "defense_runs": compare_defenses(ctx, backdoor)}


# mesa: the staircase's members (alpha, betas); the methods compared and their seeds
DEFENCE = UnitKind("defence", "units/defence", ("staircase", "defense_runs"), _defence_tables,
                   _run_triggers, (stages.MESA_BANK, stages.FREE_MESA_BANK, stages.REVERSE,
                                   stages.NEURAL_CLEANSE, stages.DEFENSE),
                   reads=("mesa", "defense_methods", "defense_seeds"))
NEURAL_CLEANSE = UnitKind("neural_cleanse", "units/neural_cleanse", ("neural_cleanse",),
                          lambda ctx, trigger: {"neural_cleanse": [neural_cleanse_row(
                              ctx, backdoored_model(ctx, trigger))]},
                          _run_triggers, (stages.NEURAL_CLEANSE,))
def pipeline_kinds(cfg) -> tuple:
    """The kinds of notebooks 01-04 under `cfg`: attack, detection, defence, and Neural
    Cleanse's when cfg.defense_methods compares one of its reversals."""
    cleanse = {"neural_cleanse", "neural_cleanse_crop"} & set(cfg.defense_methods)
    return (ATTACK, DETECTION, DEFENCE) + ((NEURAL_CLEANSE,) if cleanse else ())


# The hard-trigger screen of notebook 07's protocols: over protocols.screen_triggers (all 51).
# The screens retrain at protocols.screen_rate (not defense.poison_rate); screen_triggers lists
# their units.
_SCREENED = dict(stages=(stages.REVERSE, stages.DEFENSE), reads=("protocols",),
                 sets=("defense.poison_rate", "protocols.screen_triggers"))
SCREEN = UnitKind("screen", "screen", ("screen",),
                  lambda ctx, trigger: {"screen": screen_rows(ctx, trigger)}, screen_triggers,
                  **_SCREENED)
# Its replicates (notebook 08: is a trigger's hardness its pattern's, its model's, or noise?),
# over repeat_triggers: the original backdoors screened twice on this build of the models
# (column `repeat`: 0 the original's start and seed, 1 the next baseline start and retraining
# seed), and sibling backdoors (protocols.sibling_seed: another attack seed, the same clean
# model) screened as the original.
SCREEN_REPEAT = UnitKind(
    "screen-repeat", "screen-repeat", ("screen",),
    lambda ctx, trigger: {"screen": [{**row, "repeat": repeat} for repeat in (0, 1)
                                     for row in screen_rows(ctx, trigger, repeat=repeat)]},
    repeat_triggers, **_SCREENED)
SCREEN_SIBLING = UnitKind(
    "screen-sibling", "screen-sibling", ("screen",),
    lambda ctx, trigger: {"screen": screen_rows(ctx, trigger,
                                                attack_seed=ctx.cfg.protocols.sibling_seed)},
    repeat_triggers, **_SCREENED)
# The contrast where one reversed trigger fails (notebook 08): 07's exposure comparison
# (protocols.exposure_rates) with every method retrained from each of its retraining seeds,
# on triggers a screen ranked hardest.
CONTRAST = UnitKind("contrast", "contrast", ("contrast",),
                    lambda ctx, trigger: {"contrast": exposure_rows(
                        ctx, backdoored_model(ctx, trigger), repeated=True)},
                    lambda cfg: cfg.triggers,
                    (stages.MESA_BANK, stages.REVERSE, stages.DEFENSE),
                    reads=("protocols", "mesa", "defense_seeds"),
                    sets=("defense.poison_rate", "protocols.screen_triggers"))
KINDS = {kind.name: kind for kind in (ATTACK, DETECTION, DEFENCE, NEURAL_CLEANSE, SCREEN,
                                      SCREEN_SIBLING, SCREEN_REPEAT, CONTRAST)}
PIPELINE = "pipeline"       # the name of pipeline_kinds wherever a kind is named


def other_model_config(cfg):
    """cfg with another clean model and target (seed + 1, target + 1 modulo the 10 classes):
    the screen's replicate on another model, run as kind SCREEN."""
    return dataclasses.replace(cfg, seed=cfg.seed + 1, target=(cfg.target + 1) % 10)


def contrast_config(cfg, triggers):
    """cfg for the contrast units on `triggers`: 07's exposure comparison at the screen's rate
    (protocols.screen_rate, the paper's exposure) and at the profile's (defense.poison_rate)."""
    # visualization.triggers must be among the triggers: () draws whichever (none are drawn)
    return dataclasses.replace(
        cfg, triggers=tuple(triggers),
        visualization=dataclasses.replace(cfg.visualization, triggers=()),
        protocols=dataclasses.replace(cfg.protocols, exposure_rates=(
            cfg.protocols.screen_rate, cfg.defense.poison_rate)))


@dataclass(frozen=True)
class Screen:
    """One screen of notebook 08: its name, what it changes against the original, and where
    its units are (cfg, kind, outputs folder as units.run_units and merge_units take them)."""
    name: str
    changes: str
    cfg: object
    kind: UnitKind
    outputs: str


def screens(cfg, outputs: str | None = None) -> list:
    """The unit sets of notebook 08's screen and its replicates, as Screen values: the original
    (all screen_triggers), the same build (SCREEN_REPEAT: the original's models screened twice),
    the attack seed (SCREEN_SIBLING) and another model and target (kind SCREEN on
    other_model_config, into figures/<outputs>-seed<s>-target<t>/screen/: another config, so
    another folder); the others go beside the original's in figures/<outputs>/."""
    base = output_folder(cfg, outputs)
    other = other_model_config(cfg)
    return [Screen("original", "none", cfg, SCREEN, base),
            Screen("same build", "the original screened again on this build of the models, "
                   "then with the next baseline start and retraining seed", cfg, SCREEN_REPEAT,
                   base),
            Screen("attack seed", f"attack seed {cfg.protocols.sibling_seed}, same clean model "
                   "and target", cfg, SCREEN_SIBLING, base),
            Screen("model and target", f"clean model seed {other.seed}, target {other.target}",
                   other, SCREEN, f"{base}-seed{other.seed}-target{other.target}")]


# Row fields that may hold -1: "not applicable" (protocols.screen_rows: a trigger whose inversion
# is one of its rotations or flips has no inverted relative).
NOT_APPLICABLE = {"inverted_asr", "symmetry_max_asr"}


def _row_problem(row) -> str | None:
    """Why a table row cannot be a unit's (a non-finite number, or a share outside [0, 1]:
    a field named *asr* or *accuracy*, unless it ends in _pts or _% (points)), else None."""
    if not isinstance(row, dict):
        return f"a row is {type(row).__name__}, not an object"
    for field, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            return f"{field} is {value}"
        share = ("asr" in field or "accuracy" in field) and not field.endswith(("_pts", "_%"))
        if share and not 0 <= value <= 1 and not (field in NOT_APPLICABLE and value == -1):
            return f"{field} is {value}, outside [0, 1]"
    return None


def read_unit(path: Path, cfg, kind, fingerprint: str | None = None) -> dict | None:
    """The unit file at `path` if it exists and belongs to `cfg`, else None when it does not
    exist. A file of another config or kind, of another trigger than its name says, made from
    other data than `fingerprint` (when given; files from before units recorded it pass),
    without the kind's tables, or with a non-finite number or a share outside [0, 1] in a row
    raises ValueError naming it and what is wrong."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{path} is not a file (a folder?): a unit's result is one JSON file; "
                         "move it away to run the unit again")
    try:
        unit = json.loads(path.read_text())
        key, trigger, tables = unit["config_key"], unit["trigger"], unit["tables"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a unit result ({error}); move it away to run the "
                         "unit again") from None
    if key != config_key(cfg, kind):
        raise ValueError(f"{path} holds a unit of another config or kind (key {key}, this "
                         f"run's {kind.name} units {config_key(cfg, kind)}); it is not "
                         "overwritten: choose another outputs folder or move the file away")
    made_from = unit.get("data_fingerprint")
    if fingerprint is not None and made_from is not None and made_from != fingerprint:
        raise ValueError(f"{path} was made from other data (fingerprint {made_from[:12]}, this "
                         f"run's {fingerprint[:12]}): its rows would not be this data's; "
                         "choose another outputs folder or move the file away")
    if path.name != unit_path(path.parent, trigger).name:
        raise ValueError(f"{path} holds trigger {trigger}'s unit, not the one its name says "
                         "(copied or renamed?): move it away to run the unit again")
    for name in kind.table_names:
        rows = tables.get(name) if isinstance(tables, dict) else None
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path} has no rows of table {name!r}: it was not written by a "
                             f"{kind.name} unit of this code; move it away to run it again")
        problem = next(filter(None, map(_row_problem, rows)), None)
        if problem:
            raise ValueError(f"{path}: in table {name!r}, {problem}; a unit never writes "
                             "that, so the file was edited or damaged: move it away to run "
                             "the unit again")
    return unit


def pending_triggers(cfg, folder: Path, kind, fingerprint: str | None = None) -> list:
    """The kind's triggers (cfg.triggers for the pipeline's) without a finished unit file in
    `folder` (files of another config raise; with `fingerprint`, so do files made from other
    data)."""
    return [t for t in kind.triggers(cfg)
            if read_unit(unit_path(folder, t), cfg, kind, fingerprint) is None]


def unit_record(ctx, trigger: int, kind) -> dict:
    """One trigger's unit result: the kind's tables with the
    kind, the config, its key, the fingerprint of the data it ran on, the code version, when it
    finished and how long it took."""
    start = time.time()
    tables = kind.tables(ctx, trigger)
    return {"trigger": trigger, "kind": kind.name, "config": to_dict(ctx.cfg),
            "config_key": config_key(ctx.cfg, kind),
            "data_fingerprint": ctx.splits.fingerprint,
            **code_version(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "seconds": round(time.time() - start, 1), "tables": tables}


def write_unit(path: Path, record: dict, cfg, kind) -> Path:
    """Write a unit's record to `path` unless a file got there first (another process that
    ran the same unit): that one is kept when it is this config's, refused (read_unit's
    ValueError) when it is another's. A unit file is never replaced."""
    try:
        write_json(path, record, replace=False)
    except FileExistsError:
        read_unit(path, cfg, kind, record.get("data_fingerprint"))
    return path


def run_unit(ctx, trigger: int, folder: Path, kind) -> Path:
    """Run one trigger's unit (resuming from the store) and write its file; returns the path.
    A finished unit of the same config is left as it is."""
    path = unit_path(folder, trigger)
    if read_unit(path, ctx.cfg, kind, ctx.splits.fingerprint) is None:
        write_unit(path, unit_record(ctx, trigger, kind), ctx.cfg, kind)
    return path


def check_only(cfg, kind, only) -> set:
    """The triggers `only` names (None: all of the kind's), refused with ValueError when one is
    not among the kind's triggers of `cfg`."""
    triggers = kind.triggers(cfg)
    foreign = sorted(set(only or ()) - set(triggers))
    if foreign:
        raise ValueError(f"trigger(s) {foreign} are not among the {kind.name} "
                         f"units' triggers of this config; choose from {list(triggers)}")
    return set(triggers if only is None else only)


def run_units(cfg, outputs: str | None = None, root=None, *, kind, deadline=None,
              unit_seconds: float = 0.0, only=None, ctx=None) -> Path:
    """Every pending unit of `cfg` and `kind`, one after another in this process, in the
    kind's trigger order; returns the folder. only: just these of the kind's triggers (one
    process's share). deadline (time.time() seconds): start no unit that would not finish by
    then, judged by the slowest unit so far (unit_seconds before the first), and say which were
    left for a later run. ctx: a notebook's Context of `cfg` (its data and clean model), else
    one is set up when a unit is pending."""
    folder = unit_folder(cfg, outputs, root, kind=kind)
    cifar = ctx.splits if ctx is not None else load_cifar(cfg.dataset)
    todo = [t for t in pending_triggers(cfg, folder, kind, cifar.fingerprint)
            if t in check_only(cfg, kind, only)]
    if todo:
        ctx = ctx or setup(cfg, cifar=cifar)
        clean_model(ctx)
        for trigger in progress(_before(deadline, todo, unit_seconds, "unit"),
                                f"{kind.name} units ({cfg.profile})", total=len(todo)):
            run_unit(ctx, trigger, folder, kind)
    return folder


def _before(deadline, todo: list, expected: float, what: str):
    """The triggers of `todo`, one at a time, while the slowest so far (`expected` seconds
    before the first) would still end by `deadline` (time.time() seconds; None: no limit);
    then says which were left for a later run. The time between two yields is one's work."""
    slowest = expected
    for done, trigger in enumerate(todo):
        if deadline is not None and time.time() + slowest > deadline:
            print(f"deadline: {len(todo) - done} {what}(s) left for a later run "
                  f"({', '.join(map(str, todo[done:]))}): {deadline - time.time():.0f} s left, "
                  f"a {what} takes ~{slowest:.0f} s", flush=True)
            return
        started = time.time()
        yield trigger
        slowest = max(slowest, time.time() - started)


def merge_units(cfg, folder: Path, kind, complete: bool = False) -> dict:
    """{table: DataFrame} of every unit file of `cfg` in `folder`, in the kind's trigger order,
    with `missing`: the triggers without one (complete: refuse any, with ValueError). Files of
    another config raise ValueError."""
    triggers = kind.triggers(cfg)
    units = {t: read_unit(unit_path(folder, t), cfg, kind) for t in triggers}
    missing = [t for t in triggers if units[t] is None]
    if complete and missing:
        raise ValueError(f"{folder} has no {kind.name} unit for trigger(s) {missing}: run them "
                         f"first (run_units, or python -m mesa_utils.units --kind {kind.name})")
    merged = {name: pd.DataFrame([row for t in triggers if units[t]
                                  for row in units[t]["tables"][name]])
              for name in kind.table_names}
    merged["missing"] = missing
    return merged


def pending_in_any(cfg, outputs, root, kinds, fingerprint: str | None = None) -> list:
    """The triggers (in the first kind's order) that lack a finished unit of any of `kinds`."""
    pending = {t for kind in kinds
               for t in pending_triggers(cfg, unit_folder(cfg, outputs, root, kind=kind), kind,
                                         fingerprint)}
    return [t for t in kinds[0].triggers(cfg) if t in pending]


def kinds_named(cfg, name: str) -> tuple:
    """The kinds a command line names: pipeline_kinds(cfg) for PIPELINE, else the one."""
    return pipeline_kinds(cfg) if name == PIPELINE else (KINDS[name],)


def run_pipeline(cfg, outputs: str | None = None, root=None, deadline=None,
                 unit_seconds: float = 0.0, only=None) -> Path:
    """run_units of every kind of pipeline_kinds(cfg), trigger by trigger (so that a deadline
    leaves whole triggers done); returns the folder that holds the kinds' folders. deadline:
    start no trigger that would not finish by then, judged by the slowest trigger so far
    (unit_seconds before the first)."""
    kinds = pipeline_kinds(cfg)
    chosen = check_only(cfg, kinds[0], only)
    cifar = load_cifar(cfg.dataset)
    todo = [t for t in pending_in_any(cfg, outputs, root, kinds, cifar.fingerprint)
            if t in chosen]
    ctx = None
    for trigger in _before(deadline, todo, unit_seconds, "trigger"):
        ctx = ctx or setup(cfg, cifar=cifar)
        for kind in kinds:
            run_units(cfg, outputs, root, kind=kind, only=[trigger], ctx=ctx)
    return unit_folder(cfg, outputs, root, kind=kinds[0]).parent


# ---------------------------------------------------------------------------------------------
# Command line: `python -m mesa_utils.units` runs the units one after another in this process
# (no Ray needed: e.g. on a GPU machine with its own torch); sweep.py runs them as Ray tasks.

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every way of running units: --profile, --overrides, --outputs, --kind."""
    parser.add_argument("--profile", default=None, help="smoke, quick or paper (default: "
                        "$MESA_PROFILE, else quick)")
    parser.add_argument("--overrides", default="{}", help="config overrides as JSON, e.g. "
                        "'{\"triggers\": [170, 15], \"mesa.steps\": 100}'")
    parser.add_argument("--outputs", default=None, help="folder under figures/ (default: the "
                        "profile's, or <profile>-<config hash> with overrides)")
    parser.add_argument("--kind", choices=[PIPELINE, *KINDS], default=PIPELINE,
                        help="pipeline: every kind of notebooks 01-04 (attack, detection, "
                             "defence, neural_cleanse when compared) per trigger of the profile "
                             "(default), or one of them; screen: the hard-trigger screen of "
                             "notebook 08 over "
                             "protocols.screen_triggers (all 51 by default); screen-sibling and "
                             "screen-repeat: two of its replicates (notebook 08; the third is "
                             "kind screen with the overrides of units.other_model_config); "
                             "contrast: 07's exposure comparison, every method from each of "
                             "its retraining seeds, over the config's triggers")


def config_from_arguments(parser: argparse.ArgumentParser, args):
    """(profile, overrides, cfg) from add_run_arguments' options; bad ones end in
    parser.error naming what was wrong."""
    try:
        overrides = json.loads(args.overrides)
        if not isinstance(overrides, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        parser.error(f"--overrides must be a JSON object of config fields ({error}), got "
                     f"{args.overrides!r}")
    try:
        cfg = make_config(args.profile, **overrides)
    except ValueError as error:
        parser.error(str(error))
    return cfg.profile, overrides, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesa_utils.units",
                                     description="Run every per-trigger unit without a result "
                                                 "file, one after another in this process.")
    add_run_arguments(parser)
    parser.add_argument("--deadline", type=float, default=None, help="time.time() seconds by "
                        "which to finish: no unit is started that would end later (judged by "
                        "the slowest so far, --unit-seconds before the first)")
    parser.add_argument("--unit-seconds", type=float, default=0.0,
                        help="the expected seconds of one unit, before one has run (default 0)")
    parser.add_argument("--only", default=None, help="comma-separated triggers: run just these "
                        "of the kind's (one process's share of them)")
    args = parser.parse_args(argv)
    _, _, cfg = config_from_arguments(parser, args)
    if args.unit_seconds < 0 or not math.isfinite(args.unit_seconds):
        parser.error(f"--unit-seconds must be a number >= 0, got {args.unit_seconds}")
    kinds = kinds_named(cfg, args.kind)
    try:
        only = None if args.only is None else [int(t) for t in args.only.split(",") if t]
    except ValueError:
        parser.error(f"--only needs trigger ids separated by commas, e.g. 170,15; got "
                     f"{args.only!r}")
    try:
        chosen = check_only(cfg, kinds[0], only)
    except ValueError as error:
        parser.error(f"--only {args.only}: {error}")
    start = time.time()
    todo = [t for t in pending_in_any(cfg, args.outputs, None, kinds) if t in chosen]
    if args.kind == PIPELINE:
        folder = run_pipeline(cfg, args.outputs, deadline=args.deadline,
                              unit_seconds=args.unit_seconds, only=only)
    else:
        folder = run_units(cfg, args.outputs, kind=kinds[0], deadline=args.deadline,
                           unit_seconds=args.unit_seconds, only=only)
    left = [t for t in pending_in_any(cfg, args.outputs, None, kinds) if t in chosen]
    print(f"{args.kind} units in {shown(folder)}: {len(todo) - len(left)} trigger(s) run in "
          f"{time.time() - start:.0f} s, {len(chosen) - len(todo)} already there, "
          f"{len(left)} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
