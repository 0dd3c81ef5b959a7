"""Per-trigger units: everything after the clean model for one trigger, as one piece of work
whose output is small and tidy.

A unit runs, for one trigger id: the attack (01), target detection (02), the defence's MESA
staircase (04, 05), the single-trigger baseline, Neural Cleanse and every retraining of the
defence comparison (04). Each stage is cached in the artefact store, so an interrupted unit
resumes where it stopped. Its result is the unit's rows of every table, written atomically as
one JSON file per trigger:

    figures/<outputs>/units/unit_<trigger>.json
        {"trigger", "config" (the run's complete config), "config_key", "commit",
         "uncommitted_changes", "finished", "seconds", "tables": {table: [row, ...]}}

`merge_units` concatenates the files of one config into one DataFrame per table. A unit file
already there is a finished unit (skipped by `pending_triggers`); one written under another
config is never overwritten: the run stops and names it. Units run one after another here, or
as Ray tasks over local or cluster workers (sweep.py).
"""
import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import pandas as pd

from .config import (BlendedConfig, SampDetoxConfig, StudyConfig, VisualizationConfig,
                     make_config, to_dict)
from .defense import compare_defenses, neural_cleanse_row
from .mesa import detect_target, staircase_bank
from .outputs import code_version, output_folder
from .store import REPO_ROOT, spec_key, write_json
from .train import attack_table, backdoored_model, clean_model, progress, setup

TABLES = ("attack", "detection", "staircase", "defense_runs", "neural_cleanse")


def config_key(cfg) -> str:
    """The hash of everything a unit's rows depend on: the config less the device (where a
    run computes, not what), the trigger list (a unit is one trigger) and the sections of
    notebooks 03, 05 and 06 (study, visualization, blended, sampdetox), which no unit uses.
    Units of one profile run in several batches of triggers therefore merge."""
    neutral = dataclasses.replace(cfg, device="auto", triggers=(0,), study=StudyConfig(),
                                  visualization=VisualizationConfig(), blended=BlendedConfig(),
                                  sampdetox=SampDetoxConfig())
    return spec_key(to_dict(neutral))


def unit_folder(cfg, outputs: str | None = None, root=None) -> Path:
    """Where the unit files of `cfg` go: figures/<profile or outputs>/units/."""
    return Path(root or REPO_ROOT / "figures") / output_folder(cfg, outputs) / "units"


def unit_path(folder: Path, trigger: int) -> Path:
    return Path(folder) / f"unit_{trigger}.json"


def unit_tables(ctx, trigger: int) -> dict:
    """The rows {table: [row, ...]} of one trigger: attack (01's row), detection (02's rows),
    staircase (its sub-models' evaluation), defense_runs (04's rows) and neural_cleanse
    (04's row). Builds (or loads from the store) everything it needs."""
    backdoor = backdoored_model(ctx, trigger)
    bank = staircase_bank(ctx, backdoor)
    return {"attack": attack_table(ctx, [backdoor]).to_dict("records"),
            "detection": detect_target(ctx, backdoor),
            "staircase": [{"trigger": trigger, **row} for row in bank.evaluation],
            "defense_runs": compare_defenses(ctx, backdoor),
            "neural_cleanse": [neural_cleanse_row(ctx, backdoor)]}


def read_unit(path: Path, cfg) -> dict | None:
    """The unit file at `path` if it exists and belongs to `cfg`, else None when it does not
    exist. A file of another config (or not a unit file) raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
        key = unit["config_key"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a unit result ({error}); move it away to run the "
                         "unit again") from None
    if key != config_key(cfg):
        raise ValueError(f"{path} holds a unit of another config (key {key}, this run "
                         f"{config_key(cfg)}); it is not overwritten: choose another outputs "
                         "folder or move the file away")
    return unit


def pending_triggers(cfg, folder: Path) -> list:
    """cfg.triggers without a finished unit file in `folder` (files of another config raise)."""
    return [t for t in cfg.triggers if read_unit(unit_path(folder, t), cfg) is None]


def unit_record(ctx, trigger: int) -> dict:
    """One trigger's unit result: unit_tables with the config, its key, the code version,
    when it finished and how long it took."""
    start = time.time()
    tables = unit_tables(ctx, trigger)
    return {"trigger": trigger, "config": to_dict(ctx.cfg), "config_key": config_key(ctx.cfg),
            **code_version(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "seconds": round(time.time() - start, 1), "tables": tables}


def run_unit(ctx, trigger: int, folder: Path) -> Path:
    """Run one trigger's unit (resuming from the store) and write its file; returns the path.
    A finished unit of the same config is left as it is."""
    path = unit_path(folder, trigger)
    if read_unit(path, ctx.cfg) is None:
        write_json(path, unit_record(ctx, trigger))
    return path


def run_units(cfg, outputs: str | None = None, root=None) -> Path:
    """Every pending unit of `cfg`, one after another in this process; returns the folder."""
    folder = unit_folder(cfg, outputs, root)
    todo = pending_triggers(cfg, folder)
    if todo:
        ctx = setup(cfg)
        clean_model(ctx)
        for trigger in progress(todo, f"units ({cfg.profile})"):
            run_unit(ctx, trigger, folder)
    return folder


def merge_units(cfg, folder: Path) -> dict:
    """{table: DataFrame} of every unit file of `cfg` in `folder`, in cfg.triggers' order,
    with `missing`: the triggers without one. Files of another config raise ValueError."""
    units = {t: read_unit(unit_path(folder, t), cfg) for t in cfg.triggers}
    merged = {name: pd.DataFrame([row for t in cfg.triggers if units[t]
                                  for row in units[t]["tables"][name]])
              for name in TABLES}
    merged["missing"] = [t for t in cfg.triggers if units[t] is None]
    return merged


# ---------------------------------------------------------------------------------------------
# Command line: `python -m mesa_utils.units` runs the units one after another in this process
# (no Ray needed: e.g. on a GPU machine with its own torch); sweep.py runs them as Ray tasks.

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every way of running units: --profile, --overrides, --outputs."""
    parser.add_argument("--profile", default=None, help="smoke, quick or paper (default: "
                        "$MESA_PROFILE, else quick)")
    parser.add_argument("--overrides", default="{}", help="config overrides as JSON, e.g. "
                        "'{\"triggers\": [170, 15], \"mesa.steps\": 100}'")
    parser.add_argument("--outputs", default=None, help="folder under figures/ (default: the "
                        "profile's, or <profile>-<config hash> with overrides)")


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
    args = parser.parse_args(argv)
    _, _, cfg = config_from_arguments(parser, args)
    start = time.time()
    folder = unit_folder(cfg, args.outputs)
    todo = pending_triggers(cfg, folder)
    run_units(cfg, args.outputs)
    print(f"units in {folder}: {len(todo)} run in {time.time() - start:.0f} s, "
          f"{len(cfg.triggers) - len(todo)} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
