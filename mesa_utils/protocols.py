"""Notebook 07: the paper's central claim put to the protocols around its figure.

The paper's headline (MESA's trigger distribution removes every backdoor; one reversed trigger
fails on "hard" triggers) rests on choices its Fig. 4 does not vary. This module varies them,
each as one batched function returning tidy rows:

- `breadth_rows`: before any defence, how broadly a backdoor fires: the ASR of its trigger's
  rotations, flips and inversions, of the other 50 black-white triggers and of random 3x3
  patches. A broad backdoor is one a single reversed trigger may not cover.
- `attack_map_rows`: the attack's ASR and clean-accuracy cost over poison rate x learning rate
  x epochs, and which planting attack lies closest to the paper's (1% poison, lr 1e-3, 10
  epochs).
- `exposure_rows`: after-defence ASR against the retraining rate r, and `choose_rate`, the
  rule fixed in the config that picks r on the defender's held-out images.
- `baseline_variant_rows`: the single-trigger baseline three ways (cross-entropy; MESA's hinge
  with alpha = 0; reversed on a sibling backdoored model, the authors' protocol).

Every retraining here trains on the defender's split less its first `protocols.holdout`
images; those choose r, and the 2K eval split only reports (retrain's `holdout`).
"""
import dataclasses
import math

import pandas as pd
import torch

from .config import validate
from .defense import (Retraining, baseline_triggers, defense_sources, patch_source,
                      retrain_row, retraining_seeds)
from .intervals import bootstrap_interval
from .methods import EXPOSURE_METHODS, method_label
from .train import (Backdoor, Context, attack_success_rate, backdoored_model, clean_model,
                    eval_asr_interval, progress)
from .triggers import (BW_TRIGGER_IDS, RandomPatchSource, TriggerPaster, pattern_from_id,
                       symmetry_class, trigger_from_id)

# The attack of the paper's section 4.3: 1% of the training images poisoned, SGD at lr 1e-3,
# 10 epochs (about 5,000 poisoned images seen on CIFAR-10).
PAPER_ATTACK = {"poison_rate": 0.01, "lr": 1e-3, "epochs": 10}
# An attack plants a backdoor at this ASR or more, costing at most this much clean accuracy.
PLANTED_ASR, PLANTED_MAX_DROP_PTS = 0.9, 2.0


def with_section(ctx: Context, section: str, **changes) -> Context:
    """A Context sharing ctx's data and store whose config has `changes` in `section`
    (e.g. with_section(ctx, "defense", poison_rate=0.01)), validated like any config."""
    cfg = dataclasses.replace(ctx.cfg, **{section: dataclasses.replace(getattr(ctx.cfg, section),
                                                                       **changes)})
    validate(cfg)
    return dataclasses.replace(ctx, cfg=cfg)


def check_holdout(cfg) -> None:
    """Raise ValueError unless protocols.holdout leaves images of the defender's split to train
    on. (Checked here, before 07's work, not in every config: a split too small for 07 still
    serves notebooks 01-05.)"""
    defender_images = (cfg.test_subset or 10000) - cfg.eval_size
    if cfg.protocols.holdout >= defender_images:
        raise ValueError(f"protocols.holdout must be an integer in [1, {defender_images - 1}] "
                         f"(below the defender's split of {defender_images} images, which "
                         f"07's retrainings train on the rest of), got {cfg.protocols.holdout}")


# ---------------------------------------------------------------------------------------------
# Breadth: what else fires a backdoor, before any defence

def breadth_probes(trigger_id: int, others: bool = True) -> list:
    """(probe, probe_id, source) for every probe of a black-white trigger's backdoor: the
    original; each other pattern of its symmetry class as "rotation/flip" (same pattern turned
    or mirrored), "inverted" (its colour inversion, id 511 - t) or "inverted + rotation/flip";
    with `others`, each of the other canonical triggers as "other trigger"; and "random 3x3"
    patches (a fresh uniform patch per image, probe_id -1)."""
    pattern = pattern_from_id(trigger_id)
    turned = {int(sum(int(b) << (8 - k) for k, b in enumerate(q.flatten().tolist())))
              for p in (pattern, pattern.T) for q in (torch.rot90(p, r) for r in range(4))}
    probes = [("original", trigger_id, TriggerPaster(trigger_from_id(trigger_id)))]
    for member in symmetry_class(trigger_id):
        if member == trigger_id:
            continue
        kind = ("rotation/flip" if member in turned else
                "inverted" if member == 511 - trigger_id else "inverted + rotation/flip")
        probes.append((kind, member, TriggerPaster(trigger_from_id(member))))
    probes += [("other trigger", other, TriggerPaster(trigger_from_id(other)))
               for other in BW_TRIGGER_IDS if others and other != trigger_id]
    probes.append(("random 3x3", -1, RandomPatchSource((3, 3))))
    return probes


def breadth_rows(ctx: Context, backdoor: Backdoor, others: bool = True) -> list:
    """Rows (trigger, probe, probe_id, asr, asr_low, asr_high) of every breadth_probes probe on
    the backdoored model: ASR on the eval split's images outside the target (95% Wilson)."""
    model = backdoor.model(ctx)
    rows = []
    for probe, probe_id, source in progress(breadth_probes(backdoor.trigger, others),
                                            f"breadth of {backdoor.trigger}"):
        asr = attack_success_rate(ctx, model, ctx.splits.eval_images, ctx.splits.eval_labels,
                                  source, backdoor.target)
        low, high = eval_asr_interval(ctx, asr)
        rows.append({"trigger": backdoor.trigger, "probe": probe, "probe_id": probe_id,
                     "asr": asr, "asr_low": low, "asr_high": high})
    return rows


# ---------------------------------------------------------------------------------------------
# The attack map

def distance_to_paper(poison_rate: float, lr: float, epochs: int) -> float:
    """How far an attack lies from the paper's, in decades: |log10| of each ratio, summed."""
    return sum(abs(math.log10(value / PAPER_ATTACK[name]))
               for name, value in (("poison_rate", poison_rate), ("lr", lr), ("epochs", epochs)))


def attack_map_rows(ctx: Context) -> list:
    """The attack of protocols.map_trigger over map_epochs x map_poison_rates x map_lrs (the
    rest of cfg.attack kept), each trained from the clean model and cached: rows of ASR (95%
    Wilson), clean accuracy, its drop in points, poisoned images seen, whether it plants a
    backdoor (ASR >= PLANTED_ASR at a drop <= PLANTED_MAX_DROP_PTS), its distance_to_paper and
    whether it is this profile's own attack."""
    pcfg, attack = ctx.cfg.protocols, ctx.cfg.attack
    _, clean_record = clean_model(ctx)
    grid = [(e, p, lr) for e in pcfg.map_epochs for p in pcfg.map_poison_rates
            for lr in pcfg.map_lrs]
    rows = []
    for epochs, poison_rate, lr in progress(grid, "attack map"):
        cell = with_section(ctx, "attack", epochs=epochs, poison_rate=poison_rate, lr=lr)
        backdoor = backdoored_model(cell, pcfg.map_trigger)
        low, high = eval_asr_interval(ctx, backdoor.asr)
        drop = 100 * (clean_record["clean_accuracy"] - backdoor.clean_accuracy)
        rows.append({"trigger": pcfg.map_trigger, "epochs": epochs, "poison_rate": poison_rate,
                     "lr": lr, "asr": backdoor.asr, "asr_low": low, "asr_high": high,
                     "clean_accuracy": backdoor.clean_accuracy, "accuracy_drop_pts": drop,
                     "poisoned_images_seen": sum(h["poisoned"] for h in backdoor.record["history"]),
                     "plants": backdoor.asr >= PLANTED_ASR and drop <= PLANTED_MAX_DROP_PTS,
                     "distance_to_paper": distance_to_paper(poison_rate, lr, epochs),
                     "this_profile": (epochs, poison_rate, lr) == (attack.epochs,
                                                                    attack.poison_rate, attack.lr)})
    return rows


def closest_planting_attack(table):
    """The row of an attack_map_rows table that plants a backdoor closest to the paper's
    attack (smallest distance_to_paper, then the lowest learning rate), or None if none does."""
    planting = table[table.plants]
    if planting.empty:
        return None
    return planting.sort_values(["distance_to_paper", "lr", "poison_rate"]).iloc[0]


# ---------------------------------------------------------------------------------------------
# The exposure curve and the rule that picks r

# Retrained at every rate of the curve: methods.EXPOSURE_METHODS; of MESA only the highest
# beta's sub-model (and the mixture). finetune pastes nothing, so r does not apply to it: one
# run, shown at every rate.


def exposure_rows(ctx: Context, backdoor: Backdoor, repeated: bool = False) -> list:
    """After-defence rows (retrain_row, with holdout_asr) of EXPOSURE_METHODS at every rate r of
    protocols.exposure_rates (column `rate`), each trained on the defender's split less its
    protocols.holdout images: one seed (cfg.seed) per method, or with `repeated` each method's
    retraining_seeds (04's: defense_seeds each); the baseline's starts as its runs, MESA's
    sub-model of the highest beta only. Finetuning pastes nothing: one run per seed serves
    every rate."""
    check_holdout(ctx.cfg)
    holdout, top_beta = ctx.cfg.protocols.holdout, max(ctx.cfg.mesa.betas)
    rows = []
    finetune = {}
    for rate in ctx.cfg.protocols.exposure_rates:
        at_rate = with_section(ctx, "defense", poison_rate=rate)
        for run in defense_sources(at_rate, backdoor, EXPOSURE_METHODS):
            if run.method == "mesa" and run.beta != top_beta:
                continue
            for seed in retraining_seeds(ctx.cfg, run.method) if repeated else [ctx.cfg.seed]:
                if run.method == "finetune":
                    if seed not in finetune:
                        finetune[seed] = retrain_row(ctx, backdoor, run, seed, holdout)
                    rows.append({**finetune[seed], "rate": rate})
                    continue
                rows.append({**retrain_row(at_rate, backdoor, run, seed, holdout), "rate": rate})
    return rows


def choose_rate(table, cfg) -> tuple:
    """(rate, per_rate) by the rule fixed in cfg.protocols before any run: the smallest rate
    of the exposure table at which the ideal defence's mean held-out ASR over the triggers is at
    most ideal_max_asr; the largest rate when none is. per_rate: the ideal defence's mean
    held-out ASR at each rate, the numbers the rule read (the eval split is never read)."""
    ideal = table[table.method == "ideal"]
    per_rate = ideal.groupby("rate").holdout_asr.mean().sort_index()
    passing = per_rate[per_rate <= cfg.protocols.ideal_max_asr]
    rate = float(passing.index[0]) if len(passing) else float(per_rate.index[-1])
    return rate, per_rate


# ---------------------------------------------------------------------------------------------
# The single-trigger baseline three ways

BASELINE_VARIANTS = {
    "cross_entropy": "cross-entropy toward the target on the defended model (04's baseline)",
    "hinge": "MESA's hinge at its highest beta, alpha = 0, raw pixels (the paper's wording)",
    "sibling": "cross-entropy on a sibling backdoored model (same trigger, another attack "
               "seed), used to retrain the defended one (the authors' protocol)",
}


def baseline_variant_rows(ctx: Context, backdoor: Backdoor) -> list:
    """The baseline three ways (BASELINE_VARIANTS), each from the same random starts, each
    start's trigger retrained alike at cfg.defense.poison_rate on the defender's split less its
    holdout: retrain_row rows with `variant`, the reversed trigger's ASR on the defended model
    before retraining (reversed_asr, on the held-out images) and its L2 distance to the
    original trigger (over its 27 values in [0, 1]). The sibling's own ASR is sibling_asr."""
    check_holdout(ctx.cfg)
    holdout = ctx.cfg.protocols.holdout
    sibling = backdoored_model(ctx, backdoor.trigger, ctx.cfg.protocols.sibling_seed)
    variants = {"cross_entropy": baseline_triggers(ctx, backdoor),
                "hinge": baseline_triggers(ctx, backdoor, hinge_beta=max(ctx.cfg.mesa.betas)),
                "sibling": baseline_triggers(ctx, sibling)}
    model = backdoor.model(ctx)
    original = trigger_from_id(backdoor.trigger)
    held_images = ctx.splits.defense_images[:holdout]
    held_labels = ctx.splits.defense_labels[:holdout]
    rows = []
    for variant, triggers in variants.items():
        for start, trigger in enumerate(triggers):
            run = Retraining("baseline", *patch_source(ctx, trigger), start=start)
            row = retrain_row(ctx, backdoor, run, ctx.cfg.seed, holdout)
            rows.append({**row, "variant": variant,
                         "reversed_asr": attack_success_rate(ctx, model, held_images,
                                                             held_labels, run.source,
                                                             backdoor.target),
                         "l2_to_trigger": float((trigger - original).norm()),
                         "sibling_asr": sibling.asr})
    return rows


# ---------------------------------------------------------------------------------------------
# The hard-trigger screen: per-trigger units of kind "screen" (units.py)

def screen_triggers(cfg) -> tuple:
    """The triggers the screen covers: protocols.screen_triggers, or all 51 when empty."""
    return cfg.protocols.screen_triggers or BW_TRIGGER_IDS


def hardest_triggers(screen, k: int = 3) -> list:
    """The k triggers of a screen table (screen_rows rows) whose attack planted a backdoor
    (asr_before >= PLANTED_ASR) with the largest mean held-out ASR after the retraining, ties
    broken by the lower id: the held-out images choose, the eval split never does."""
    planted = screen[screen.asr_before >= PLANTED_ASR]
    ranking = planted.groupby("trigger").holdout_asr.mean().reset_index()
    ranking = ranking.sort_values(["holdout_asr", "trigger"], ascending=[False, True])
    return [int(t) for t in ranking.trigger[:k]]


def repeat_triggers(cfg) -> tuple:
    """The triggers the retraining replicate of the screen covers: every third of
    screen_triggers in id order (17 of the 51); a short screen (12 or fewer, as smoke's) whole.
    Fixed by id, not by any screen's result, so that the replicate measures the noise of the
    whole ranking, not of its extremes."""
    triggers = screen_triggers(cfg)
    return triggers[::3] if len(triggers) > 12 else triggers


def screen_rows(ctx: Context, trigger: int, attack_seed: int = 0, repeat: int = 0) -> list:
    """The screen of one trigger: its attack (01's, cached; attack_seed k > 0: a sibling,
    the same attack with other batches and poisoned images), the baseline's protocols.
    screen_starts starts from start repeat x screen_starts on (repeat 0: the first), each
    retrained at protocols.screen_rate from seed cfg.seed + repeat on the defender's split
    less its holdout (retrain_row rows: holdout_asr ranks the triggers, the eval split only
    reports), each with the reversed trigger's ASR on the held-out images and its L2
    distance to the original, and the backdoor's breadth over its symmetry class and random
    3x3 patches (eval split, before any defence): inverted_asr (-1 for a trigger whose
    inversion is a rotation or flip of it), symmetry_max_asr, random_patch_asr."""
    check_holdout(ctx.cfg)
    pcfg, holdout = ctx.cfg.protocols, ctx.cfg.protocols.holdout
    first = repeat * pcfg.screen_starts
    if repeat < 0 or first + pcfg.screen_starts > ctx.cfg.baseline.starts:
        raise ValueError(f"a screen's repeat {repeat} needs baseline starts {first} to "
                         f"{first + pcfg.screen_starts - 1}, but baseline.starts is "
                         f"{ctx.cfg.baseline.starts}: raise baseline.starts or lower "
                         "protocols.screen_starts")
    backdoor = backdoored_model(ctx, trigger, attack_seed)
    breadth = pd.DataFrame(breadth_rows(ctx, backdoor, others=False))
    relatives = breadth[~breadth.probe.isin(["original", "random 3x3"])]
    inverted = breadth[breadth.probe == "inverted"].asr
    at_rate = with_section(ctx, "defense", poison_rate=pcfg.screen_rate)
    model, original = backdoor.model(ctx), trigger_from_id(trigger)
    held_images = ctx.splits.defense_images[:holdout]
    held_labels = ctx.splits.defense_labels[:holdout]
    reversed_triggers = baseline_triggers(ctx, backdoor)
    rows = []
    for start in range(first, first + pcfg.screen_starts):
        run = Retraining("baseline", *patch_source(ctx, reversed_triggers[start]), start=start)
        row = retrain_row(at_rate, backdoor, run, ctx.cfg.seed + repeat, holdout)
        rows.append({**row, "rate": pcfg.screen_rate,
                     "reversed_asr": attack_success_rate(ctx, model, held_images, held_labels,
                                                         run.source, backdoor.target),
                     "l2_to_trigger": float((reversed_triggers[start] - original).norm()),
                     "inverted_asr": float(inverted.iloc[0]) if len(inverted) else -1.0,
                     "symmetry_max_asr": float(relatives.asr.max()) if len(relatives) else -1.0,
                     "random_patch_asr": float(breadth[breadth.probe == "random 3x3"].asr.iloc[0])})
    return rows


def mean_table(table, by: list, value: str = "asr_after"):
    """Per group of `by`: runs, the mean of `value` in % with its 95% bootstrap interval over
    the group's runs, and the worst (largest) run, rounded to 0.01 points (the group keys are
    kept as they are: a rate of 0.025 must stay a key, not become 0.02)."""
    if "method" in table and "beta" in table:
        table = table.assign(method=[method_label(m, b) for m, b in zip(table.method, table.beta)])
    rows = []
    for key, part in table.groupby(by, sort=False):
        low, high = bootstrap_interval(part[value].to_numpy())
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))),
                     "runs": len(part), "mean_%": 100 * part[value].mean(), "low_%": 100 * low,
                     "high_%": 100 * high, "worst_%": 100 * part[value].max()})
    return pd.DataFrame(rows).round({"mean_%": 2, "low_%": 2, "high_%": 2, "worst_%": 2})
