"""Per-trigger units and the Ray sweep on the smoke profile (real CIFAR-10 subsets, own store):
a unit's rows are the stages' rows, finished units are skipped, another config's file is never
overwritten, two Ray workers give exactly the in-process tables, and a failing unit is
reported while the other finishes."""
import json

import pandas as pd
import pytest
import torch

from mesa_utils.config import make_config
from mesa_utils.defense import compare_defenses
from mesa_utils.mesa import detect_target
from mesa_utils.store import spec_key
from mesa_utils.train import backdoor_spec, backdoored_model, setup
from mesa_utils.triggers import random_colour_trigger
from mesa_utils.units import (ATTACK, DEFENCE, DETECTION, NEURAL_CLEANSE, config_key,
                              merge_units, pending_in_any, pending_triggers, pipeline_kinds,
                              run_pipeline, run_units, unit_folder, unit_path)

CPU = {"device": "cpu"}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store of this test's own (Ray workers inherit the variable)."""
    monkeypatch.setenv("MESA_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def _frame(rows):
    return pd.DataFrame(rows).reset_index(drop=True)


def _merged(cfg, root, outputs=None):
    """{table: DataFrame} of every pipeline kind's units of `cfg` under root/<outputs>."""
    return {name: frame for kind in pipeline_kinds(cfg)
            for name, frame in merge_units(cfg, unit_folder(cfg, outputs, root, kind=kind), kind,
                                           complete=True).items() if name != "missing"}


def test_units_hold_the_stages_rows_merge_and_are_not_run_twice(tmp_path, store):
    cfg = make_config("smoke", **CPU)
    root = tmp_path / "figures"
    # 01 runs its attack units alone: no detection generator or retraining is trained
    folder = run_units(cfg, root=root, kind=ATTACK)
    assert folder == unit_folder(cfg, root=root, kind=ATTACK) and folder.parts[-2:] == (
        "units", "attack")
    assert pending_triggers(cfg, folder, ATTACK) == [] and not (store / "mesa").exists()
    assert pending_in_any(cfg, None, root, pipeline_kinds(cfg)) == list(cfg.triggers)
    assert run_pipeline(cfg, root=root) == folder.parent
    assert pending_in_any(cfg, None, root, pipeline_kinds(cfg)) == []
    merged = _merged(cfg, root)
    # The unit's rows are what the notebooks' stage functions give (same store, same seeds).
    ctx = setup(cfg)
    for trigger in cfg.triggers:
        backdoor = backdoored_model(ctx, trigger)
        for name, rows in (("detection", detect_target(ctx, backdoor)),
                           ("defense_runs", compare_defenses(ctx, backdoor))):
            part = merged[name][merged[name].trigger == trigger]
            pd.testing.assert_frame_equal(_frame(part), _frame(rows), check_dtype=False)
    for name in ("attack", "staircase", "neural_cleanse"):
        assert set(merged[name].trigger) == set(cfg.triggers)
    # A second run finds every unit finished and writes nothing.
    files = sorted(folder.parent.rglob("unit_*.json"))
    assert len(files) == len(pipeline_kinds(cfg)) * len(cfg.triggers)
    stamps = [f.stat().st_mtime_ns for f in files]
    run_pipeline(cfg, root=root)
    assert stamps == [f.stat().st_mtime_ns for f in files]
    record = json.loads(unit_path(unit_folder(cfg, root=root, kind=DEFENCE), 0).read_text())
    assert record["config_key"] == config_key(cfg, DEFENCE) and record["kind"] == "defence"
    assert set(record["tables"]) == {"staircase", "defense_runs"}
    # the kinds differ in key; a file of one copied into another's folder is refused
    assert len({config_key(cfg, kind) for kind in pipeline_kinds(cfg)}) == 4
    copied = unit_path(unit_folder(cfg, root=root, kind=DETECTION), 0)
    copied.write_text(unit_path(folder, 0).read_text())
    with pytest.raises(ValueError, match="another config or kind"):
        merge_units(cfg, copied.parent, DETECTION)


def test_the_pipeline_runs_only_the_methods_it_compares(tmp_path, store):
    methods = ("mesa_mixture", "baseline", "finetune")
    cfg = make_config("smoke", **CPU, triggers=(170,), defense_methods=methods)
    assert pipeline_kinds(cfg) == (ATTACK, DETECTION, DEFENCE)     # no Neural Cleanse
    run_pipeline(cfg, root=tmp_path)
    runs = _merged(cfg, tmp_path)["defense_runs"]
    assert list(dict.fromkeys(runs.method)) == list(methods)
    assert (runs.method == "finetune").sum() == cfg.defense_seeds
    assert not (store / "neural_cleanse").exists()
    assert NEURAL_CLEANSE in pipeline_kinds(make_config("smoke"))
    with pytest.raises(ValueError, match="defense_methods must include 'mesa_mixture' and "
                                         "'baseline'"):
        make_config("smoke", defense_methods=("baseline", "ideal"))
    with pytest.raises(ValueError, match=r"defense_methods\[1\] must be one of"):
        make_config("smoke", defense_methods=("baseline", "mesa_mix"))


def test_a_unit_file_of_another_config_is_never_overwritten(tmp_path, store):
    cfg = make_config("smoke", **CPU)
    folder = unit_folder(cfg, root=tmp_path, kind=DETECTION)
    path = unit_path(folder, cfg.triggers[0])
    path.parent.mkdir(parents=True)
    other = make_config("smoke", **{"mesa.steps": 7, "detection.steps": 7})
    path.write_text(json.dumps({"trigger": cfg.triggers[0],
                                "config_key": config_key(other, DETECTION), "tables": {}}))
    with pytest.raises(ValueError, match="holds a unit of another config.*not overwritten"):
        run_units(cfg, root=tmp_path, kind=DETECTION)
    assert json.loads(path.read_text())["config_key"] == config_key(other, DETECTION)
    # the device is where a unit runs, not what it computes; the trigger list and notebook
    # 03/05's sections are no unit's business: units run in batches of triggers merge
    assert config_key(make_config("smoke", device="cuda"), DEFENCE) == config_key(cfg, DEFENCE)
    batch = make_config("smoke", triggers=(15, 186), **{"visualization.triggers": (),
                                                       "study.samples": 9})
    assert config_key(batch, DEFENCE) == config_key(cfg, DEFENCE) != config_key(other, DEFENCE)
    fewer = make_config("smoke", defense_methods=("mesa_mixture", "baseline"))
    assert config_key(fewer, DEFENCE) != config_key(cfg, DEFENCE)


@pytest.mark.parametrize("args, message", [
    (["--overrides", "[1]"], "--overrides must be a JSON object of config fields"),
    (["--overrides", "{"], "--overrides must be a JSON object of config fields"),
    (["--profile", "smoke", "--overrides", '{"mesa.steps": 0}'],
     "mesa.steps must be an integer >= 1, got 0"),
])
@pytest.mark.parametrize("module", ["units", "sweep"])
def test_unit_commands_reject_bad_arguments_before_any_work(module, args, message, capsys):
    main = __import__(f"mesa_utils.{module}", fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_ray_sweep_with_two_workers_equals_the_in_process_tables_and_survives_a_failure(
        tmp_path, store):
    from mesa_utils.sweep import run_sweep
    cfg = make_config("smoke", **CPU)
    run_pipeline(cfg, outputs="in-process", root=tmp_path)
    in_process = _merged(cfg, tmp_path, "in-process")
    result = run_sweep("smoke", CPU, workers=2, outputs="ray", root=tmp_path)
    assert sorted(result["done"]) == sorted(cfg.triggers) and not result["failed"]
    assert result["folder"] == unit_folder(cfg, "ray", tmp_path, kind=ATTACK).parent
    parallel = _merged(cfg, tmp_path, "ray")
    assert set(parallel) == set(in_process) == {"attack", "detection", "staircase",
                                                "defense_runs", "neural_cleanse"}
    for name, table in in_process.items():      # the notebooks' tables, byte for byte
        assert parallel[name].to_csv(index=False) == table.to_csv(index=False), name
    # A rerun skips every finished unit.
    again = run_sweep("smoke", CPU, workers=2, outputs="ray", root=tmp_path)
    assert again["done"] == [] and sorted(again["skipped"]) == sorted(cfg.triggers)
    # A corrupt artefact makes one unit fail; it is reported with its trigger and traceback,
    # the other unit finishes.
    broken = make_config("smoke", **CPU, **{"attack.epochs": 2})
    first, second = broken.triggers
    ctx = setup(broken)
    key = backdoored_model(ctx, second).key
    (store / "backdoor" / f"{key}.pt").write_bytes(b"not an artefact")
    result = run_sweep("smoke", {**CPU, "attack.epochs": 2}, workers=2, outputs="broken",
                       root=tmp_path)
    assert result["done"] == [first] and list(result["failed"]) == [second]
    assert "cannot read cached" in result["failed"][second]
    assert unit_path(result["folder"], second).with_suffix(".error.txt").exists()
    attack_folder = unit_folder(broken, "broken", tmp_path, kind=ATTACK)
    assert merge_units(broken, attack_folder, ATTACK)["missing"] == [second]
    with pytest.raises(ValueError, match=f"no attack unit for trigger.*\\[{second}\\]"):
        merge_units(broken, attack_folder, ATTACK, complete=True)
    # Repaired, the rerun finishes it, and the failure's traceback goes with the failure.
    (store / "backdoor" / f"{key}.pt").unlink()
    fixed = run_sweep("smoke", {**CPU, "attack.epochs": 2}, workers=2, outputs="broken",
                      root=tmp_path)
    assert fixed["done"] == [second] and not fixed["failed"]
    assert not unit_path(result["folder"], second).with_suffix(".error.txt").exists()


@pytest.mark.parametrize("cpus, gpus, message", [
    (0, 0.0, "--cpus-per-unit must be an integer >= 1"),
    (1, -1.0, "--gpus-per-unit must be a share in"), (1, float("nan"), "--gpus-per-unit"),
    (1, 1.5, "--gpus-per-unit must be a share in")])
def test_a_units_resource_request_is_checked_before_anything_runs(cpus, gpus, message):
    from mesa_utils.sweep import check_share
    with pytest.raises(ValueError, match=message):
        check_share(cpus, gpus)
    check_share(2, 0.25)
    check_share(1, 2.0)


def test_a_sweep_the_cluster_can_never_hold_or_reach_is_refused_at_once(tmp_path, store):
    import time
    from mesa_utils.sweep import check_grantable, check_reachable, run_sweep
    with pytest.raises(ValueError, match="--gpus-per-unit 0.25 asks more GPUs than the cluster"):
        check_grantable({"CPU": 2.0}, 1, 0.25)
    with pytest.raises(ValueError, match="--cpus-per-unit 2 asks more CPUs than the cluster"):
        check_grantable({"CPU": 1.0, "GPU": 1.0}, 2, 0.0)
    check_grantable({"CPU": 4.0, "GPU": 1.0}, 2, 0.25)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="no Ray cluster answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(ValueError, match="--address must be 'auto' or host:port"):
        check_reachable("nowhere")
    # Ray on this machine without a GPU: refused before the clean model is trained
    with pytest.raises(ValueError, match="asks more GPUs than the cluster has"):
        run_sweep("smoke", CPU, workers=1, gpus_per_unit=0.25, outputs="gpu", root=tmp_path)
    assert time.monotonic() - start < 30          # refused, not hung
    assert not (store / "clean").exists()


def test_a_random_colour_trigger_set_runs_through_the_same_units(tmp_path, store):
    # Appendix B's random-colour triggers: numbered, seeded, attacked and defended alike
    cfg = make_config("smoke", **CPU, trigger_set="random_colour", triggers=(3,),
                      **{"visualization.triggers": ()})
    run_pipeline(cfg, root=tmp_path)
    assert set(_merged(cfg, tmp_path)["defense_runs"].trigger) == {3}
    ctx = setup(cfg)
    backdoor = backdoored_model(ctx, 3)
    assert backdoor.trigger_set == "random_colour"
    assert torch.equal(backdoor.source().trigger, random_colour_trigger(3))
    # its models are keyed apart from black-white trigger 3
    black_white = setup(make_config("smoke", **CPU, triggers=(3,),
                                    **{"visualization.triggers": ()}))
    assert spec_key(backdoor_spec(ctx, 3)) != spec_key(backdoor_spec(black_white, 3))


def test_screen_units_run_over_their_own_triggers_and_key_on_the_protocols(tmp_path, store):
    from mesa_utils.protocols import screen_rows
    from mesa_utils.units import SCREEN
    cfg = make_config("smoke", **CPU, **{"protocols.screen_triggers": (0, 7)})
    folder = run_units(cfg, root=tmp_path, kind=SCREEN)
    assert folder == unit_folder(cfg, root=tmp_path, kind=SCREEN) and folder.name == "screen"
    assert sorted(p.name for p in folder.glob("*.json")) == ["unit_0.json", "unit_7.json"]
    merged = merge_units(cfg, folder, SCREEN)
    assert merged["missing"] == [] and list(merged["screen"].trigger) == [0, 7]
    row = merged["screen"].iloc[0]
    assert (row.method, row.start, row.rate) == ("baseline", 0, cfg.protocols.screen_rate)
    assert 0 <= row.holdout_asr <= 1 and 0 <= row.inverted_asr <= 1     # 0's inversion: 511
    # as Ray tasks, into their own folder: the same rows
    from mesa_utils.sweep import run_sweep
    result = run_sweep("smoke", {**CPU, "protocols.screen_triggers": [0, 7]}, workers=2,
                       outputs="ray", root=tmp_path, kind="screen")
    assert sorted(result["done"]) == [0, 7] and result["folder"].name == "screen"
    pd.testing.assert_frame_equal(merge_units(cfg, result["folder"], SCREEN)["screen"],
                                  merged["screen"])
    rows = screen_rows(setup(cfg), 7)                   # the same rows again, from the store
    pd.testing.assert_frame_equal(_frame(merged["screen"][merged["screen"].trigger == 7]),
                                  _frame(rows), check_dtype=False)
    # the screen's triggers do not change its key; its rate does; the pipeline ignores both;
    # the defence's rate and methods are not the screen's (it retrains at its own)
    more = make_config("smoke", **{"protocols.screen_triggers": (1,)})
    faster = make_config("smoke", **{"protocols.screen_rate": 0.5})
    assert config_key(more, SCREEN) == config_key(cfg, SCREEN) != config_key(faster, SCREEN)
    assert config_key(faster, DEFENCE) == config_key(cfg, DEFENCE)
    other_defence = make_config("smoke", defense_methods=("mesa_mixture", "baseline"),
                                **{"protocols.screen_triggers": (0, 7), "defense.poison_rate": 0.3})
    assert config_key(other_defence, SCREEN) == config_key(cfg, SCREEN)


def test_screen_replicates_are_kinds_of_their_own_over_the_same_models(tmp_path, store):
    from mesa_utils.protocols import screen_rows
    from mesa_utils.units import SCREEN, SCREEN_REPEAT, SCREEN_SIBLING, screens
    cfg = make_config("smoke", **CPU, **{"protocols.screen_triggers": (0, 7, 15, 186)})
    listed = screens(cfg, "run")
    assert [s.name for s in listed] == ["original", "same build", "attack seed",
                                        "model and target"]
    assert [s.kind for s in listed] == [SCREEN, SCREEN_REPEAT, SCREEN_SIBLING, SCREEN]
    assert listed[3].outputs == "run-seed1-target1"
    assert (listed[3].cfg.seed, listed[3].cfg.target) == (cfg.seed + 1, (cfg.target + 1) % 10)
    keys = {config_key(cfg, kind) for kind in (SCREEN, SCREEN_REPEAT, SCREEN_SIBLING)}
    assert len(keys) == 3
    small = make_config("smoke", **CPU, **{"protocols.screen_triggers": (0,)})
    original = merge_units(small, run_units(small, root=tmp_path, kind=SCREEN), SCREEN)["screen"]
    ctx = setup(small)
    repeat = merge_units(small, run_units(small, root=tmp_path, kind=SCREEN_REPEAT),
                         SCREEN_REPEAT)["screen"]
    # the same build twice: the original's start and seed again (here the same build, so the
    # same row), then the next start from the next seed, on the same backdoored model
    assert (repeat.repeat.tolist(), repeat.start.tolist()) == ([0, 1], [0, 1])
    assert repeat.seed.tolist() == [small.seed, small.seed + 1]
    assert repeat.holdout_asr.iloc[0] == original.holdout_asr.iloc[0]
    assert repeat.asr_before.tolist() == 2 * original.asr_before.tolist()
    sibling = merge_units(small, run_units(small, root=tmp_path, kind=SCREEN_SIBLING),
                          SCREEN_SIBLING)["screen"]
    assert (sibling.start.tolist(), sibling.seed.tolist()) == ([0], [small.seed])
    backdoor = backdoored_model(ctx, 0, small.protocols.sibling_seed)
    assert sibling.asr_before.tolist() == [backdoor.asr]
    weights = [next(b.model(ctx).parameters()) for b in (backdoor, backdoored_model(ctx, 0))]
    assert not torch.equal(*weights)                    # another attack of the same trigger
    # one screen's file in another's folder is refused, not read as its rows
    repeat_file = unit_path(unit_folder(small, root=tmp_path, kind=SCREEN_REPEAT), 0)
    repeat_file.write_text(unit_path(unit_folder(small, root=tmp_path, kind=SCREEN), 0)
                           .read_text())
    with pytest.raises(ValueError, match="another config or kind.*screen-repeat"):
        run_units(small, root=tmp_path, kind=SCREEN_REPEAT)
    with pytest.raises(ValueError, match="repeat 2 needs baseline starts 2 to 2.*baseline.starts"
                                         " is 2"):
        screen_rows(ctx, 0, repeat=2)


def _fabricated_unit(folder, cfg, trigger, kind, **row):
    """A unit file as a unit of `kind` writes it, with one row of each table."""
    from mesa_utils.units import unit_path
    folder.mkdir(parents=True, exist_ok=True)
    tables = {name: [{"trigger": trigger, "asr_after": 0.1, "inverted_asr": -1.0, **row}]
              for name in kind.table_names}
    path = unit_path(folder, trigger)
    path.write_text(json.dumps({"trigger": trigger, "config_key": config_key(cfg, kind),
                                "tables": tables}))
    return path


@pytest.mark.parametrize("damage, message", [
    ({"asr_after": float("nan")}, "asr_after is nan"),
    ({"asr_after": 7.5}, "asr_after is 7.5, outside"),
    ({"holdout_clean_accuracy": -0.2}, "holdout_clean_accuracy is -0.2, outside"),
    ({"symmetry_max_asr": -2.0}, "symmetry_max_asr is -2.0, outside"),
    ({"seconds": float("inf")}, "seconds is inf"),
])
def test_an_edited_unit_file_is_refused_on_read_naming_the_field(tmp_path, damage, message):
    from mesa_utils.units import SCREEN
    cfg = make_config("smoke", **{"protocols.screen_triggers": (0, 7)})
    folder = tmp_path / "screen"
    # sound: -1 is "not applicable", and a field in points (_pts, _%) is no share
    _fabricated_unit(folder, cfg, 0, SCREEN, accuracy_drop_pts=5.5, **{"patch_asr_%": 97.0})
    assert merge_units(cfg, folder, SCREEN)["missing"] == [7]
    _fabricated_unit(folder, cfg, 7, SCREEN, **damage)
    with pytest.raises(ValueError, match=f"unit_7.json: in table 'screen', {message}"):
        merge_units(cfg, folder, SCREEN)
    with pytest.raises(ValueError, match="edited or damaged"):
        pending_triggers(cfg, folder, SCREEN)


def test_a_unit_file_copied_onto_another_trigger_or_without_rows_is_refused(tmp_path):
    from mesa_utils.units import SCREEN
    cfg = make_config("smoke", **{"protocols.screen_triggers": (0, 7)})
    folder = tmp_path / "screen"
    source = _fabricated_unit(folder, cfg, 0, SCREEN)
    (folder / "unit_7.json").write_text(source.read_text())          # cp unit_0 unit_7
    with pytest.raises(ValueError, match="unit_7.json holds trigger 0's unit, not the one"):
        merge_units(cfg, folder, SCREEN)
    unit = json.loads(source.read_text())
    (folder / "unit_7.json").write_text(json.dumps({**unit, "trigger": 7,
                                                    "tables": {"screen": []}}))
    with pytest.raises(ValueError, match="unit_7.json has no rows of table 'screen'"):
        pending_triggers(cfg, folder, SCREEN)


def test_a_unit_written_while_another_process_finished_it_first_is_never_replaced(tmp_path):
    from mesa_utils.units import SCREEN, write_unit
    cfg = make_config("smoke", **{"protocols.screen_triggers": (0,)})
    other = make_config("smoke", **{"protocols.screen_rate": 0.5})
    folder = tmp_path / "screen"
    theirs = _fabricated_unit(folder, other, 0, SCREEN)     # B got there first, another config
    before = theirs.read_bytes()
    ours = {"trigger": 0, "config_key": config_key(cfg, SCREEN),
            "tables": {"screen": [{"trigger": 0, "asr_after": 0.2}]}}
    with pytest.raises(ValueError, match="another config or kind"):
        write_unit(theirs, ours, cfg, SCREEN)
    assert theirs.read_bytes() == before
    same = _fabricated_unit(folder, cfg, 0, SCREEN)         # the same config's: kept as it is
    kept = same.read_bytes()
    write_unit(same, ours, cfg, SCREEN)
    assert same.read_bytes() == kept and [p.name for p in folder.iterdir()] == ["unit_0.json"]


def test_a_folder_where_a_unit_file_belongs_is_refused_naming_it(tmp_path):
    from mesa_utils.units import SCREEN
    cfg = make_config("smoke", **{"protocols.screen_triggers": (0,)})
    (tmp_path / "screen" / "unit_0.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="unit_0.json is not a file"):
        pending_triggers(cfg, tmp_path / "screen", SCREEN)


def test_units_made_from_other_data_are_refused_not_merged(tmp_path, store):
    from mesa_utils.data import load_cifar
    from mesa_utils.units import SCREEN
    cfg = make_config("smoke", **CPU, **{"protocols.screen_triggers": (0,)})
    folder = unit_folder(cfg, root=tmp_path, kind=SCREEN)
    path = _fabricated_unit(folder, cfg, 0, SCREEN)
    assert run_units(cfg, root=tmp_path, kind=SCREEN) == folder    # no fingerprint: kept
    unit = json.loads(path.read_text())
    path.write_text(json.dumps({**unit, "data_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="unit_0.json was made from other data"):
        run_units(cfg, root=tmp_path, kind=SCREEN)
    path.write_text(json.dumps({**unit, "data_fingerprint": load_cifar("cifar10").fingerprint}))
    run_units(cfg, root=tmp_path, kind=SCREEN)                     # this data's: kept as it is
    assert json.loads(path.read_text())["tables"] == unit["tables"]
