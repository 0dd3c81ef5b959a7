"""Notebook 09: MESA for triggers of unknown size and shape, the paper's future work.

The paper's generators output 3x3 triggers: the defender must know the trigger's size. Its
conclusion names the way out, built here: generators that output colour AND transparency for
every pixel of an S x S window (mesa.bank_trigger_shape), blended in at a random place
(triggers.apply_trigger), each with a transparency cost in its loss so that opacity its hinge
does not need fades (config.UnknownSizeConfig). 09 attacks triggers of other shapes
(triggers.TRIGGER_SETS), detects their target with size-free generators, and retrains each
backdoored model with the methods of COMPARED.

The transparency cost is measured on a classifier whose answer is known (PatternDetector: it
fires on one 4x4 pattern only): there a size-free generator should end with about 16 opaque
pixels whose samples fire it (known_answer_rows; tests/test_unknown_size.py).
"""
import dataclasses
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import mesa
from .analysis import interval_finding
from .config import MesaConfig
from .defense import compare_defenses
from .methods import CONTRAST_MESA, CONTROLS
from .protocols import mean_table
from .train import Context, attack_table, backdoored_model
from .triggers import shape_mask, shaped_black_white_trigger, trigger_size

# What 09 compares on every trigger: the size-free MESA, today's MESA assuming 3x3 (its
# uniform mixture, as in every contrast), Neural Cleanse's mask (of any size) cut to its box
# and pasted at random places, one reversed 3x3 trigger (the assumed size), the ideal defence
# and the two controls.
COMPARED = ("mesa_free", CONTRAST_MESA, "neural_cleanse_crop", "baseline", "ideal", *CONTROLS)
# The staircases whose sub-models 09 evaluates: (name, size-free, transparency cost used).
GENERATORS = (("3x3", False, None), ("size-free", True, None),
              ("size-free, no transparency cost", True, 0.0))


def for_trigger_set(ctx: Context, trigger_set: str, **unknown_size) -> Context:
    """ctx with cfg.trigger_set (and fields of cfg.unknown_size) replaced."""
    cfg = dataclasses.replace(ctx.cfg, trigger_set=trigger_set, unknown_size=dataclasses.replace(
        ctx.cfg.unknown_size, **unknown_size))
    return dataclasses.replace(ctx, cfg=cfg)


def comparison_context(ctx: Context, trigger_set: str) -> Context:
    """The context of 09's retrainings of a trigger of `trigger_set`: COMPARED, retrained for
    unknown_size.epochs at rate unknown_size.poison_rate (the rest of cfg.defense kept)."""
    ctx = for_trigger_set(ctx, trigger_set)
    u = ctx.cfg.unknown_size
    defense = dataclasses.replace(ctx.cfg.defense, epochs=u.epochs, poison_rate=u.poison_rate)
    return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, defense=defense,
                                                            defense_methods=COMPARED))


def shape_backdoors(ctx: Context) -> list:
    """The Backdoor of each trigger of 09: triggers 0 .. triggers_per_set - 1 of every set of
    cfg.unknown_size.trigger_sets, attacked as 01 attacks (cfg.attack), trained once, cached.
    Trigger k of every set is attacked from the same seed (train.backdoored_model): those
    attacks differ in their trigger only."""
    u = ctx.cfg.unknown_size
    return [backdoored_model(for_trigger_set(ctx, trigger_set), number)
            for trigger_set in u.trigger_sets for number in range(u.triggers_per_set)]


def shape_label(trigger_set: str) -> str:
    """How 09's tables name a trigger set (column trigger_size): its shape
    (triggers.trigger_size), with " colour" for Appendix B's random colours: "2x2", "L4x4",
    "3x3 colour"."""
    return trigger_size(trigger_set) + (" colour" if trigger_set == "random_colour" else "")


def trigger_pixels(trigger_set: str) -> int:
    """How many pixels a trigger of `trigger_set` covers (its shape's mask)."""
    return int(shape_mask(trigger_size(trigger_set)).sum())


def _described(backdoor, rows) -> list:
    """rows of one backdoor, led by its trigger set, shape and area in pixels."""
    return [{"trigger_size": shape_label(backdoor.trigger_set),
             "trigger_set": backdoor.trigger_set,
             "trigger_pixels": trigger_pixels(backdoor.trigger_set), **row} for row in rows]


def attack_rows(ctx: Context, backdoors) -> pd.DataFrame:
    """01's attack table (train.attack_table) of 09's backdoors, with their shapes."""
    table = attack_table(ctx, backdoors)
    table.insert(0, "trigger_size", [shape_label(s) for s in table.trigger_set])
    table.insert(2, "trigger_pixels", [trigger_pixels(s) for s in table.trigger_set])
    return table


def detection_rows(ctx: Context, backdoor) -> list:
    """Target detection with size-free generators (mesa.detect_target, size_free): one row
    per class."""
    return _described(backdoor, mesa.detect_target(for_trigger_set(ctx, backdoor.trigger_set),
                                                   backdoor, size_free=True))


def generator_rows(ctx: Context, backdoor) -> list:
    """The staircase's sub-models of each of GENERATORS against one backdoored model,
    evaluated on the defender's split (mesa.evaluate_bank: asr, target_softmax, mi, empty;
    opaque_pixels for the size-free ones), with columns generator and transparency_cost."""
    rows = []
    for name, size_free, cost in GENERATORS:
        at = for_trigger_set(ctx, backdoor.trigger_set,
                             **({} if cost is None else {"transparency_cost": cost}))
        bank = mesa.staircase_bank(at, backdoor, size_free=size_free)
        used = at.cfg.unknown_size.transparency_cost if size_free else None
        rows += [{"generator": name, "transparency_cost": used, **row} for row in bank.evaluation]
    return _described(backdoor, rows)


def comparison_rows(ctx: Context, backdoor) -> list:
    """COMPARED retrained on one backdoored model (defense.compare_defenses under
    comparison_context): one row per run, with its trigger's shape."""
    return _described(backdoor, compare_defenses(
        comparison_context(ctx, backdoor.trigger_set), backdoor))


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per trigger shape and method: runs, the mean after-defence ASR in % with its 95%
    bootstrap interval over the runs and the worst run (protocols.mean_table), and the mean
    clean accuracy after the defence and its change, in %/points."""
    table = mean_table(runs, ["trigger_size", "method"])
    clean = (runs.assign(clean_after_pct=100 * runs.clean_after,
                         clean_change_pts=100 * (runs.clean_after - runs.clean_before))
             .groupby(["trigger_size", "method"], sort=False)[["clean_after_pct",
                                                                "clean_change_pts"]]
             .mean().round(2).reset_index())
    return table.merge(clean, on=["trigger_size", "method"])


def findings(summary: pd.DataFrame, detected: pd.DataFrame, generators: pd.DataFrame) -> list:
    """09's findings as sentences, from its tables: per shape (summary_table), the size-free
    MESA's after-defence ASR against today's MESA (3x3), Neural Cleanse's crop, the baseline,
    the ideal defence and the controls (95% intervals below, above or overlapping); where it
    failed (not below the random-patch control); the target found by size-free detection
    (analysis.detection_summary, one row per trigger); and the opaque area of its staircase
    (generator_rows) against the trigger's."""
    def text(row):
        return f"{row['mean_%']:.1f}% [{row['low_%']:.1f}, {row['high_%']:.1f}]"

    lines, failed = [], []
    for shape, part in summary.groupby("trigger_size", sort=False):
        by = part.set_index("method")
        free = by.loc["mesa_free"]
        against = []
        for method, name in ((CONTRAST_MESA, "MESA assuming 3x3"),
                             ("neural_cleanse_crop", "Neural Cleanse's crop"),
                             ("baseline", "one reversed 3x3 trigger"), ("ideal", "ideal"),
                             ("random_patch", "random 3x3 patches"), ("finetune", "fine-tuning")):
            if method in by.index:
                finding = interval_finding(free, by.loc[method])
                word = {"MESA lower": "below", "baseline lower": "above",
                        "overlap": "overlapping"}[finding]
                against.append(f"{name} {text(by.loc[method])} ({word})")
        if "random_patch" in by.index and interval_finding(
                free, by.loc["random_patch"]) != "MESA lower":
            failed.append(shape)
        lines.append(f"**{shape}**: size-free MESA {text(free)}, clean accuracy "
                     f"{free['clean_after_pct']:.1f}%; against " + "; ".join(against) + ".")
    lines.append("The size-free MESA is not below the random-patch control (95% intervals) on: "
                 + (", ".join(failed) if failed else "no shape") + ".")
    missed = detected[~detected.correct]
    lines.append(f"Size-free detection flags the true target alone on {int(detected.correct.sum())}"
                 f" of {len(detected)} triggers" + (
                     f" (not on {', '.join(map(str, missed.trigger))}: flagged "
                     f"{'; '.join(map(str, missed.flagged_classes))})" if len(missed) else "")
                 + f"; margins {detected.margin.min():.2f} to {detected.margin.max():.2f}.")
    free = generators[generators.generator == "size-free"]
    area = free.groupby("trigger_size", sort=False).agg(
        opaque=("opaque_pixels", "mean"), pixels=("trigger_pixels", "first"))
    lines.append("Opaque pixels of the size-free staircase (mean over its sub-models) against "
                 "the trigger's: " + "; ".join(f"{shape} {row.opaque:.1f} vs {row.pixels:.0f}"
                                               for shape, row in area.iterrows()) + ".")
    return lines


def step_seconds(ctx: Context, backdoor, steps: int, repeats: int = 2) -> pd.DataFrame:
    """What a size-free staircase costs against today's: `steps` steps of mesa.train_bank of
    the staircase's members against one backdoored model, 3x3 then size-free, `repeats`
    times alternately; per generator the median seconds per step and its ratio to 3x3's."""
    members, mcfg = mesa.staircase_members(ctx.cfg), ctx.cfg.mesa
    mcfg = dataclasses.replace(mcfg, steps=steps)
    splits, classifier = ctx.splits, backdoor.model(ctx)
    rows = []
    for repeat in range(repeats):
        for name, size_free in (("3x3", False), ("size-free", True)):
            start = time.perf_counter()
            mesa.train_bank(ctx, classifier, members, mcfg, splits.defense_images,
                            splits.defense_labels, mesa.bank_trigger_shape(ctx.cfg, size_free),
                            desc=f"timing {name}",
                            transparency_cost=ctx.cfg.unknown_size.transparency_cost)
            rows.append({"generator": name, "repeat": repeat,
                         "seconds_per_step": (time.perf_counter() - start) / steps})
    table = pd.DataFrame(rows).groupby("generator", sort=False).seconds_per_step.median()
    return pd.DataFrame({"seconds_per_step": table.round(4),
                         "ratio_to_3x3": (table / table["3x3"]).round(2)}).reset_index()


# ---------------------------------------------------------------------------------------------
# A classifier with a known answer: it fires on one pattern only

class PatternDetector(nn.Module):
    """Class 0 (the target) fires where `pattern` (C, h, w) in {0, 1} appears anywhere in the
    image: logit_0 = sharpness * (tolerance - d), d the soft minimum (-logsumexp(-d_w)) of the
    squared distances d_w between the pattern and every h x w window; every other logit is 0.
    Pixels (N, C, H, W) in [0, 1] -> logits (N, num_classes). No training: its backdoor is
    known by construction."""

    def __init__(self, pattern, num_classes: int = 2, sharpness: float = 2.0,
                 tolerance: float = 4.0):
        super().__init__()
        self.register_buffer("pattern", pattern[None].float())
        self.num_classes, self.sharpness, self.tolerance = num_classes, sharpness, tolerance

    def forward(self, x):
        x = x.float()
        cross = F.conv2d(x, self.pattern)                                   # (N, 1, H', W')
        energy = F.conv2d(x * x, torch.ones_like(self.pattern))
        distance = (energy - 2 * cross + self.pattern.square().sum()).flatten(1)
        # a soft minimum over the windows (temperature 1): every window near the pattern gets
        # a gradient, not only the image's best one (which a pasted trigger rarely is at first)
        distance = -torch.logsumexp(-distance, 1)
        fires = self.sharpness * (self.tolerance - distance)
        return torch.cat([fires[:, None], fires.new_zeros(len(x), self.num_classes - 1)], 1)


KNOWN_PATTERN = ("4x4", 0)     # the detector's pattern: black-white 4x4 trigger number 0


def known_answer_rows(ctx: Context, costs, seeds, mcfg: MesaConfig, images, beta=0.9,
                      alpha=None) -> list:
    """Size-free generators (window cfg.unknown_size.max_size) trained against a
    PatternDetector of KNOWN_PATTERN, one per (transparency cost, seed), on uint8 `images`
    (N, H, W, C) labelled non-target: per generator its asr and target_softmax on the images,
    opaque_pixels (mean summed transparency) and pattern_pixels, the answer (16).
    alpha: the entropy weight (default mcfg's)."""
    pattern = shaped_black_white_trigger(*KNOWN_PATTERN)
    detector = PatternDetector(pattern, ctx.splits.num_classes).to(ctx.device)
    labels = torch.ones(len(images), dtype=torch.long, device=images.device)
    size = ctx.cfg.unknown_size.max_size
    rows = []
    for cost in costs:
        members = [mesa.Member(beta, mcfg.alpha if alpha is None else alpha, 0, seed)
                   for seed in seeds]
        generators, stats, _ = mesa.train_bank(ctx, detector, members, mcfg, images, labels,
                                               (4, size, size), desc=f"known answer, cost {cost:g}",
                                               transparency_cost=cost)
        evaluation = mesa.evaluate_bank(ctx, detector, generators, stats, members,
                                        mcfg.eval_samples, images, labels, ctx.cfg.seed)
        rows += [{"transparency_cost": cost, "seed": row["seed"], "asr": row["asr"],
                  "target_softmax": row["target_softmax"],
                  "opaque_pixels": row["opaque_pixels"],
                  "pattern_pixels": int(pattern[0].numel())} for row in evaluation]
    return rows
