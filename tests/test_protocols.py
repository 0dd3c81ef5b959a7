"""Notebook 07's pieces on known cases: the breadth probes, the hinge and sibling baselines,
retraining on the defender's split less a holdout, the exposure curve's runs, the rule that
picks r, the attack map's distance to the paper, and the bootstrap table."""
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import mesa_utils.protocols as protocols
from mesa_utils.config import BaselineConfig, make_config
from mesa_utils.defense import Retraining, retrain, reverse_triggers
from mesa_utils.triggers import BW_TRIGGER_IDS, pattern_from_id, symmetry_class
from tests.conftest import BrightPatchModel


def turned(trigger_id):
    pattern = pattern_from_id(trigger_id)
    return [torch.rot90(p, k) for p in (pattern, pattern.T) for k in range(4)]


@pytest.mark.parametrize("trigger_id", [170, 15, 1])
def test_breadth_probes_name_every_relative_of_the_trigger_and_every_other_trigger(trigger_id):
    probes = protocols.breadth_probes(trigger_id)
    kinds = {}
    for kind, probe_id, _ in probes:
        kinds.setdefault(kind, []).append(probe_id)
    assert kinds["original"] == [trigger_id] and kinds["random 3x3"] == [-1]
    assert sorted(kinds["other trigger"]) == sorted(set(BW_TRIGGER_IDS) - {trigger_id})
    relatives = (kinds.get("rotation/flip", []) + kinds.get("inverted", [])
                 + kinds.get("inverted + rotation/flip", []))
    assert sorted(relatives + [trigger_id]) == list(symmetry_class(trigger_id))
    for member in kinds.get("rotation/flip", []):
        assert any(torch.equal(pattern_from_id(member), p) for p in turned(trigger_id))
    for member in kinds.get("inverted + rotation/flip", []):
        assert not any(torch.equal(pattern_from_id(member), p) for p in turned(trigger_id))
    if "inverted" in kinds:
        assert kinds["inverted"] == [511 - trigger_id]
    # each probe pastes its own pattern
    grey = torch.full((2, 3, 32, 32), 0.5)
    for kind, probe_id, source in probes[:-1]:
        out = source(grey, torch.Generator().manual_seed(0))
        changed = (out != grey).any(1)[0].nonzero()
        (top, left) = changed.min(0).values.tolist() if len(changed) else (0, 0)
        window = out[0, 0, top:top + 3, left:left + 3]
        assert window.shape == (3, 3) and set(window.unique().tolist()) <= {0.0, 1.0}


def test_hinge_baseline_starts_like_cross_entropy_and_stops_at_beta(toy_ctx):
    model, images = BrightPatchModel(), toy_ctx.splits.defense_images
    bcfg = BaselineConfig(starts=3, steps=40, lr=0.5, batch_size=16)
    starts = reverse_triggers(toy_ctx, model, 0, replace(bcfg, steps=0), images)
    # A hinge already satisfied at every start has no gradient: the starts come back unchanged.
    satisfied = reverse_triggers(toy_ctx, model, 0, bcfg, images, hinge_beta=1e-9)
    assert torch.equal(satisfied, starts)
    hinge = reverse_triggers(toy_ctx, model, 0, bcfg, images, hinge_beta=0.9)
    cross_entropy = reverse_triggers(toy_ctx, model, 0, bcfg, images)
    assert (hinge.flatten(1).mean(1) > model.valid_brightness(0.9) - 0.02).all()
    # cross-entropy keeps pushing past beta; the hinge stops once F passes it
    assert (cross_entropy.flatten(1).mean(1) >= hinge.flatten(1).mean(1)).all()


def test_a_sibling_attack_is_its_own_model_on_the_same_clean_model(toy_ctx, monkeypatch):
    import mesa_utils.train as train
    made = []
    monkeypatch.setattr(train, "_attacked", lambda ctx, spec, source, seed, desc:
                        made.append((spec, seed)) or {"asr": 1.0, "clean_accuracy": 0.5})
    monkeypatch.setattr(train, "clean_spec", lambda ctx: {"stage": "clean"})
    itself = train.backdoored_model(toy_ctx, 170)
    sibling = train.backdoored_model(toy_ctx, 170, attack_seed=1)
    (own_spec, own_seed), (sibling_spec, sibling_seed) = made
    assert own_spec == train.backdoor_spec(toy_ctx, 170)     # attack_seed 0: the original
    assert sibling_spec == {**own_spec, "attack_seed": 1}
    assert sibling_spec["parent"] == own_spec["parent"]       # the same clean model
    assert (own_seed, sibling_seed) == (toy_ctx.cfg.seed + 170, toy_ctx.cfg.seed + 170 + 512)
    assert itself.key != sibling.key


def test_retraining_with_a_holdout_trains_on_the_rest_and_scores_the_holdout(toy_ctx,
                                                                           monkeypatch):
    import mesa_utils.defense as defense
    trained, scored = [], []
    monkeypatch.setattr(defense, "fit", lambda ctx, model, images, labels, *a, **k:
                        trained.append(len(images)) or [])
    monkeypatch.setattr(defense, "attack_success_rate", lambda ctx, model, images, *a, **k:
                        scored.append(len(images)) or 0.25)
    backdoor = SimpleNamespace(key="k", target=0, model=lambda ctx: BrightPatchModel(),
                               source=lambda: None)
    ctx = replace(toy_ctx, cfg=replace(toy_ctx.cfg, save_retrained=False))
    plain = retrain(ctx, backdoor, None, {"kind": "none"})
    held = retrain(ctx, backdoor, None, {"kind": "none"}, holdout=16)
    n = len(toy_ctx.splits.defense_images)
    assert trained == [n, n - 16] and scored == [len(toy_ctx.splits.eval_images),
                                                 len(toy_ctx.splits.eval_images), 16]
    assert "holdout_asr" not in plain and held["holdout_asr"] == 0.25
    assert set(held) >= {"holdout_clean_accuracy"}
    assert len(list((toy_ctx.store.root / "defense").glob("*.pt"))) == 2   # keyed apart


def test_exposure_curve_retrains_each_method_at_each_rate_and_finetune_once(toy_ctx,
                                                                           monkeypatch):
    ctx = replace(toy_ctx, cfg=make_config("smoke", device="cpu", amp="off",
                                           **{"protocols.exposure_rates": (0.05, 0.1, 0.2)}))
    sources = [Retraining("mesa", "s", {}, beta=0.5), Retraining("mesa", "s", {}, beta=0.9),
               Retraining("mesa_mixture", "s", {}), Retraining("baseline", "s", {}, start=0),
               Retraining("baseline", "s", {}, start=1), Retraining("ideal", "s", {}),
               Retraining("finetune", None, {}), Retraining("random_patch", "s", {})]
    asked = []
    monkeypatch.setattr(protocols, "defense_sources",
                        lambda c, b, methods: asked.append(methods) or sources)
    runs = []

    def fake_row(c, backdoor, run, seed, holdout):
        runs.append((run.method, run.beta, run.start, c.cfg.defense.poison_rate, holdout, seed))
        return {"method": run.method, "beta": run.beta, "start": run.start, "seed": seed}
    monkeypatch.setattr(protocols, "retrain_row", fake_row)
    # repeated (the contrast units): every method from each of its retraining seeds, the
    # baseline's starts as its runs, finetuning once per seed for every rate
    three = replace(ctx, cfg=replace(ctx.cfg, defense_seeds=3))
    repeated = protocols.exposure_rows(three, SimpleNamespace(trigger=170), repeated=True)
    assert len(repeated) == 3 * (3 * 5 + 2) and sorted({r["seed"] for r in repeated}) == [0, 1, 2]
    assert sorted(r[5] for r in runs if r[0] == "finetune") == [0, 1, 2]
    assert sorted((r["start"], r["seed"]) for r in repeated
                  if r["method"] == "baseline" and r["rate"] == 0.1) == [(0, 0), (1, 0)]
    runs.clear(), asked.clear()
    rows = protocols.exposure_rows(ctx, SimpleNamespace(trigger=170))
    assert asked == [protocols.EXPOSURE_METHODS] * 3
    assert all(run[4] == ctx.cfg.protocols.holdout for run in runs)
    assert [r for r in runs if r[0] == "finetune"] == [
        ("finetune", None, None, ctx.cfg.defense.poison_rate, ctx.cfg.protocols.holdout, 0)]
    for rate in (0.05, 0.1, 0.2):
        at_rate = [(r[0], r[1], r[2]) for r in runs if r[3] == rate and r[0] != "finetune"]
        assert at_rate == [("mesa", 0.9, None), ("mesa_mixture", None, None),
                           ("baseline", None, 0), ("baseline", None, 1), ("ideal", None, None),
                           ("random_patch", None, None)]
    assert len(rows) == 3 * 7 and {r["rate"] for r in rows} == {0.05, 0.1, 0.2}


def test_the_rate_rule_reads_only_the_held_out_asr_of_the_ideal_defence():
    cfg = make_config("smoke", **{"protocols.ideal_max_asr": 0.05})

    def table(held):
        # the eval split's ASR says the opposite of the held-out one: it must not be read
        return pd.DataFrame([{"method": m, "rate": r, "trigger": t, "holdout_asr": a,
                              "asr_after": 1 - a} for r, a in held.items() for t in (1, 2)
                             for m in ("ideal", "finetune")])
    rate, per_rate = protocols.choose_rate(table({0.01: 0.2, 0.025: 0.06, 0.05: 0.04,
                                                  0.1: 0.03}), cfg)
    assert rate == 0.05 and per_rate.to_dict() == {0.01: 0.2, 0.025: 0.06, 0.05: 0.04, 0.1: 0.03}
    assert protocols.choose_rate(table({0.01: 0.3, 0.1: 0.2}), cfg)[0] == 0.1  # none: largest


def test_distance_to_the_papers_attack_and_the_closest_planting_one():
    assert protocols.distance_to_paper(0.01, 1e-3, 10) == 0
    assert protocols.distance_to_paper(0.1, 1e-2, 1) == pytest.approx(3)
    grid = pd.DataFrame([
        {"poison_rate": 0.1, "lr": 1e-2, "epochs": 1, "plants": True},
        {"poison_rate": 0.01, "lr": 1e-2, "epochs": 1, "plants": True},
        {"poison_rate": 0.01, "lr": 1e-3, "epochs": 1, "plants": False}])
    grid["distance_to_paper"] = [protocols.distance_to_paper(p, lr, e)
                                 for p, lr, e in zip(grid.poison_rate, grid.lr, grid.epochs)]
    closest = protocols.closest_planting_attack(grid)
    assert (closest.poison_rate, closest.lr) == (0.01, 1e-2)
    assert protocols.closest_planting_attack(grid.assign(plants=False)) is None


def test_mean_table_gives_mean_interval_and_worst_per_group():
    runs = pd.DataFrame({"method": ["baseline"] * 3 + ["mesa"] * 2, "beta": [None] * 3 + [0.9] * 2,
                         "asr_after": [0.1, 0.2, 0.3, 0.05, 0.05]})
    table = protocols.mean_table(runs, ["method"]).set_index("method")
    assert table.loc["baseline", "mean_%"] == 20 and table.loc["baseline", "worst_%"] == 30
    assert table.loc["baseline", "low_%"] < 20 < table.loc["baseline", "high_%"]
    assert table.loc["mesa beta=0.9", "runs"] == 2
    assert table.loc["mesa beta=0.9", ["low_%", "high_%"]].tolist() == [5, 5]
    # group keys are not rounded with the statistics: rows stay addressable by their rate
    by_rate = protocols.mean_table(runs.assign(rate=[0.025, 0.025, 0.01, 0.025, 0.01]),
                                   ["rate", "method"]).set_index(["rate", "method"])
    assert by_rate.loc[(0.025, "baseline"), "runs"] == 2
    assert by_rate.loc[(0.025, "mesa beta=0.9"), "mean_%"] == 5


def test_protocols_config_rejects_a_holdout_as_large_as_the_defenders_split():
    cfg = make_config("smoke")
    defender = cfg.test_subset - cfg.eval_size
    protocols.check_holdout(make_config("smoke", **{"protocols.holdout": defender - 1}))
    with pytest.raises(ValueError, match=r"protocols.holdout must be an integer in \[1, "):
        protocols.check_holdout(make_config("smoke", **{"protocols.holdout": defender}))
    with pytest.raises(ValueError, match="protocols.map_trigger must be a canonical trigger"):
        make_config("smoke", **{"protocols.map_trigger": 511})


def test_the_retraining_replicate_screens_every_third_trigger_by_id():
    quick = make_config("quick")
    assert protocols.repeat_triggers(quick) == BW_TRIGGER_IDS[::3]
    assert len(protocols.repeat_triggers(quick)) == 17
    smoke = make_config("smoke")        # a short screen is replicated whole
    assert protocols.repeat_triggers(smoke) == protocols.screen_triggers(smoke)


def test_the_hardest_triggers_are_planted_and_ranked_on_held_out_images():
    screen = pd.DataFrame({"trigger": [5, 9, 2, 7, 1],
                           "asr_before": [0.99, 0.95, 0.5, 0.97, 0.98],     # 2 never planted
                           "holdout_asr": [0.20, 0.30, 0.90, 0.30, 0.10],
                           "asr_after": [0.9, 0.0, 0.9, 0.0, 0.9]})        # never read
    assert protocols.hardest_triggers(screen, 3) == [7, 9, 5]              # a tie: the lower id


def test_the_contrast_units_key_is_the_command_lines():
    from mesa_utils.units import (CONTRAST, DEFENCE, config_key, contrast_config,
                                  other_model_config)
    quick = make_config("quick")
    cfg = contrast_config(other_model_config(quick), [27, 114, 69])
    assert cfg.protocols.exposure_rates == (quick.protocols.screen_rate,
                                            quick.defense.poison_rate) == (0.025, 0.05)
    typed = make_config("quick", seed=1, target=1, triggers=(27, 114, 69),
                        **{"protocols.exposure_rates": (0.025, 0.05)})
    assert config_key(cfg, CONTRAST) == config_key(typed, CONTRAST)
    assert config_key(cfg, CONTRAST) != config_key(typed, DEFENCE)  # the kind is in the key
