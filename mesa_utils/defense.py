"""Defences: retraining with a trigger source, the single-trigger baseline, Neural Cleanse.

Retraining (paper, eq. 5) fine-tunes the backdoored model on the defender's 8K split, pasting
a trigger from the source on each image with probability r and keeping the TRUE labels, so the
model unlearns the trigger -> target association. The sources compared in 04_defense:
MESA sub-models (one per beta), their uniform mixture and their mixture with Algorithm 1's
weights; the uniform mixture of the size-free staircase (notebook 09: colour and transparency
over an S x S window, blended in); the baseline's single reversed trigger (raw 3x3 pixels optimised toward the target,
several random starts); Neural Cleanse's reversed mask + pattern, at its place and cut to its
mask's bounding box at random places; and the original trigger itself (the ideal defence). Two controls are retrained alike: `finetune` (no trigger at all)
and `random_patch` (a fresh uniformly random 3x3 patch per poisoned image): a defence earns
its ASR only below what they reach.
"""
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import to_pixels
from .mesa import staircase_bank
from .methods import DEFAULT_METHODS, METHODS, method_label
from .models import ResNetBank, frozen
from .stages import DEFENSE, NEURAL_CLEANSE, REVERSE
from .train import (Backdoor, Context, FiniteGuard, attack_success_rate, autocast,
                    clean_accuracy, eval_asr_interval, fit, fit_bank, progress,
                    state_dict_cpu)
from .triggers import RandomPatchSource, TriggerPaster, apply_trigger, random_positions


# ---------------------------------------------------------------------------------------------
# Baseline: single reversed trigger, several random starts optimised as one batch

def reverse_triggers(ctx: Context, classifier, target, bcfg, images, seed=0,
                     hinge_beta=None) -> torch.Tensor:
    """bcfg.starts raw triggers (S, 3, 3, 3) in [0, 1] optimised toward `target`.

    Each start: uniform random init, SGD (lr, momentum) on the cross-entropy toward the target
    of its trigger pasted on a batch of images, clipped to [0, 1] after each step. With
    `hinge_beta` the loss is instead MESA's hinge max(0, beta - softmax_target) with no entropy
    term (alpha = 0, the paper's wording of its baseline): it stops pushing once the target
    softmax passes beta. The starts are the same either way (drawn first from `seed`).
    """
    device, s, b = ctx.device, bcfg.starts, bcfg.batch_size
    classifier = frozen(classifier)
    generator = torch.Generator(device).manual_seed(seed)
    pixels = torch.rand(s, 3, 3, 3, device=device, generator=generator).requires_grad_(True)
    optimizer = torch.optim.SGD([pixels], lr=bcfg.lr, momentum=bcfg.momentum)
    labels = torch.full((s * b,), target, device=device)
    guard = FiniteGuard("baseline reversal", bcfg.steps,
                        f"Lower baseline.lr (now {bcfg.lr:g}).", device)
    for step in progress(range(bcfg.steps), "baseline reversal"):
        index = torch.randint(len(images), (s * b,), device=device, generator=generator)
        x = apply_trigger(to_pixels(images[index]), pixels.repeat_interleave(b, 0),
                          generator=generator)
        with autocast(device, ctx.amp):
            logits = classifier(x)
        if hinge_beta is None:
            per_image = F.cross_entropy(logits.float(), labels, reduction="none")
        else:
            per_image = F.relu(hinge_beta - logits.float().softmax(1)[:, target])
        # Sum of per-start means: each start gets exactly its own gradient.
        loss = per_image.view(s, b).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        guard.watch(step, loss)
        with torch.no_grad():
            pixels.clamp_(0, 1)
    guard.finish([("reversed triggers", pixels.detach())])
    return pixels.detach()


# ---------------------------------------------------------------------------------------------
# Neural Cleanse (Wang et al., IEEE S&P 2019): mask + pattern per class, MAD outlier test

class MaskSource:
    """Neural Cleanse's trigger: x' = (1 - mask) * x + mask * pattern, as a trigger source on
    pixels. mask (1, H, W) and pattern (3, H, W) in [0, 1]."""

    def __init__(self, mask, pattern):
        self.mask, self.pattern = mask, pattern

    def __call__(self, images, generator=None):
        return (1 - self.mask) * images + self.mask * self.pattern


def crop_to_mask(mask, pattern, threshold: float = 0.5) -> tuple:
    """Neural Cleanse's reversal cut to the bounding box of its mask's pixels at or above
    `threshold` (the single largest pixel when none is): (mask (1, h, w), pattern (3, h, w)).
    The backdoor fires anywhere, so 04 also retrains with this crop pasted at random places."""
    strong = (mask[0] >= min(threshold, float(mask.max()))).nonzero()
    (top, left), (bottom, right) = strong.min(0).values.tolist(), strong.max(0).values.tolist()
    return (mask[:, top:bottom + 1, left:right + 1].clone(),
            pattern[:, top:bottom + 1, left:right + 1].clone())


class MaskedPatchPaster:
    """A patch with its own mask, mask (1, h, w) and pattern (C, h, w) in [0, 1], blended in at
    a random position per image: x' = (1 - m) x + m p over its window; a trigger source."""

    def __init__(self, mask, pattern):
        self.mask, self.pattern = mask, pattern

    def __call__(self, images, generator=None):
        n, c, height, width = images.shape
        corners = random_positions(n, (height, width), tuple(self.mask.shape[-2:]),
                                   images.device, generator)
        mask = apply_trigger(images.new_zeros(n, 1, height, width), self.mask, corners,
                             check=False)
        pattern = apply_trigger(images.new_zeros(n, c, height, width), self.pattern, corners,
                                check=False)
        return (1 - mask) * images + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """MAD anomaly index (|x - median| / (1.4826 * MAD)) of per-class mask L1 norms (C,)."""
    median = norms.median()
    mad = 1.4826 * (norms - median).abs().median()
    return (norms - median).abs() / mad.clamp(min=1e-12)


def neural_cleanse(ctx: Context, classifier, ncfg, images, seed=0) -> dict:
    """Reverse a mask + pattern for every class at once; flag the outliers.

    Per class c: minimise CE(P((1-m) x + m p), c) + cost_c * |m|_1 with Adam (lr, betas
    (0.5, 0.9)), m = tanh(.)/2 + 0.5; cost_c starts at init_cost and is raised (lowered) after
    `patience` checks with ASR above (below) asr_threshold. Keeps each class's smallest mask
    that reached the threshold. Returns masks (C, 1, H, W), patterns (C, 3, H, W), l1 (C,),
    anomaly (C,), flagged (C,) bool: anomaly index above the threshold with a small norm.
    """
    device, num_classes, b = ctx.device, ctx.splits.num_classes, ncfg.batch_size
    height, width = images.shape[1:3]
    classifier = frozen(classifier)
    generator = torch.Generator(device).manual_seed(seed)
    mask_param = (torch.rand(num_classes, 1, height, width, device=device, generator=generator)
                  * 4 - 2).requires_grad_(True)
    pattern_param = (torch.rand(num_classes, 3, height, width, device=device,
                                generator=generator) * 4 - 2).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=ncfg.lr, betas=(0.5, 0.9))
    cost = torch.full((num_classes,), ncfg.init_cost, device=device)
    up = torch.zeros(num_classes, device=device)
    down = torch.zeros(num_classes, device=device)
    best_l1 = torch.full((num_classes,), float("inf"), device=device)
    best_mask = torch.zeros(num_classes, 1, height, width, device=device)
    best_pattern = torch.zeros(num_classes, 3, height, width, device=device)
    labels = torch.arange(num_classes, device=device).repeat_interleave(b)
    hits = torch.zeros(num_classes, device=device)
    guard = FiniteGuard("Neural Cleanse", ncfg.steps,
                        f"Lower neural_cleanse.lr (now {ncfg.lr:g}).", device)
    for step in progress(range(ncfg.steps), "Neural Cleanse"):
        index = torch.randint(len(images), (num_classes * b,), device=device, generator=generator)
        x = to_pixels(images[index])
        mask = torch.tanh(mask_param) / 2 + 0.5                            # (C, 1, H, W)
        pattern = torch.tanh(pattern_param) / 2 + 0.5                       # (C, 3, H, W)
        m, p = mask.repeat_interleave(b, 0), pattern.repeat_interleave(b, 0)
        with autocast(device, ctx.amp):
            logits = classifier((1 - m) * x + m * p)
        ce = F.cross_entropy(logits.float(), labels, reduction="none").view(num_classes, b)
        l1 = mask.flatten(1).sum(1)
        loss = (ce.mean(1) + cost * l1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        guard.watch(step, loss)
        with torch.no_grad():
            hits += (logits.argmax(1) == labels).view(num_classes, b).float().mean(1)
            if (step + 1) % ncfg.check_every == 0:
                asr = hits / ncfg.check_every
                hits.zero_()
                good = asr >= ncfg.asr_threshold
                better = good & (l1 < best_l1)
                best_l1 = torch.where(better, l1, best_l1)
                best_mask[better] = mask[better]
                best_pattern[better] = pattern[better]
                up = torch.where(good, up + 1, torch.zeros_like(up))
                down = torch.where(good, torch.zeros_like(down), down + 1)
                cost = torch.where(up >= ncfg.patience, cost * ncfg.cost_multiplier, cost)
                cost = torch.where(down >= ncfg.patience, cost / ncfg.cost_multiplier ** 1.5, cost)
                up[up >= ncfg.patience] = 0
                down[down >= ncfg.patience] = 0
    guard.finish([("mask", mask_param.detach()), ("pattern", pattern_param.detach())])
    with torch.no_grad():   # classes that never reached the threshold keep their last mask
        never = torch.isinf(best_l1)
        final = torch.tanh(mask_param) / 2 + 0.5
        best_mask[never] = final[never]
        best_pattern[never] = (torch.tanh(pattern_param) / 2 + 0.5)[never]
        l1 = best_mask.flatten(1).sum(1)
        anomaly = anomaly_index(l1)
        flagged = (anomaly > ncfg.anomaly_threshold) & (l1 < l1.median())
    return {"masks": best_mask.cpu(), "patterns": best_pattern.cpu(), "l1": l1.cpu(),
            "anomaly": anomaly.cpu(), "flagged": flagged.cpu(), "reached": (~never).cpu()}


# ---------------------------------------------------------------------------------------------
# Retraining and the whole comparison for one trigger

def retrain(ctx: Context, backdoor: Backdoor, source, source_spec: dict, seed=0,
            desc="defence", holdout: int = 0) -> dict:
    """Fine-tune a copy of the backdoored model with `source` (true labels kept), cached.

    Returns a record with clean_accuracy and asr (of the ORIGINAL trigger) on the 2K eval
    split, the training history, and the retrained weights (unless cfg.save_retrained is off).
    holdout > 0 trains on the defender's split less its first `holdout` images and adds
    holdout_asr and holdout_clean_accuracy measured on those (for choices made before the eval
    split is looked at, notebook 07).
    """
    return retrain_many(ctx, backdoor, [(source, source_spec, seed, desc)], holdout)[0]


def retrain_many(ctx: Context, backdoor: Backdoor, runs: list, holdout: int = 0) -> list:
    """`retrain` for each of `runs`, (source, source spec, seed, progress label) tuples: one
    record each, cached one by one under retrain's keys (stages.DEFENSE).
    The runs not in the store train cfg.retrain_bank at a time as one banked network
    (train.fit_bank; its members end as the lone runs would, to float rounding); with
    retrain_bank = 1, one after another (fit)."""
    cfg = ctx.cfg
    images, labels = ctx.splits.defense_images[holdout:], ctx.splits.defense_labels[holdout:]
    specs = [DEFENSE.spec(cfg, backdoor.key, source=source_spec, seed=seed, holdout=holdout)
             for _, source_spec, seed, _ in runs]
    records = [ctx.store.load(DEFENSE.name, spec) for spec in specs]
    missing = [i for i, record in enumerate(records) if record is None]
    for first in range(0, len(missing), cfg.retrain_bank):
        chunk = missing[first:first + cfg.retrain_bank]
        if len(chunk) == 1:
            (i,) = chunk
            models = [backdoor.model(ctx)]
            histories = [fit(ctx, models[0], images, labels, cfg.defense, "defense",
                             source=runs[i][0], target=None, seed=runs[i][2], desc=runs[i][3])]
        else:
            bank = ResNetBank([backdoor.model(ctx) for _ in chunk])
            histories = fit_bank(ctx, bank, images, labels, cfg.defense, "defense",
                                 [runs[i][0] for i in chunk], [runs[i][2] for i in chunk],
                                 desc=f"retrain {len(chunk)} as one bank, trigger "
                                      f"{backdoor.trigger}")
            models = []
            for member in range(len(chunk)):
                model = backdoor.model(ctx)
                model.load_state_dict(bank.member_state_dict(member))
                models.append(model.eval())
        for i, model, history in zip(chunk, models, histories):
            records[i] = _retrained_record(ctx, backdoor, model, history, holdout)
            ctx.store.put(DEFENSE.name, specs[i], records[i])
    return records


def _retrained_record(ctx: Context, backdoor: Backdoor, model, history, holdout: int) -> dict:
    """retrain's record of a retrained `model`: its eval-split (and holdout) metrics."""
    splits = ctx.splits
    record = {"history": history,
              "clean_accuracy": clean_accuracy(ctx, model, splits.eval_images,
                                               splits.eval_labels),
              "asr": attack_success_rate(ctx, model, splits.eval_images, splits.eval_labels,
                                         backdoor.source(), backdoor.target)}
    if holdout:
        held_images, held_labels = splits.defense_images[:holdout], splits.defense_labels[:holdout]
        record["holdout_clean_accuracy"] = clean_accuracy(ctx, model, held_images, held_labels)
        record["holdout_asr"] = attack_success_rate(ctx, model, held_images, held_labels,
                                                    backdoor.source(), backdoor.target)
    if ctx.cfg.save_retrained:
        record["state_dict"] = state_dict_cpu(model)
    return record


def baseline_triggers(ctx: Context, backdoor: Backdoor, hinge_beta=None) -> torch.Tensor:
    """The baseline's reversed triggers (starts, 3, 3, 3) for a backdoored model, cached:
    cross-entropy toward the target, or MESA's hinge at `hinge_beta` (reverse_triggers)."""
    cfg = ctx.cfg
    spec = REVERSE.spec(cfg, backdoor.key, hinge_beta=hinge_beta)

    def build():
        return reverse_triggers(ctx, backdoor.model(ctx), backdoor.target, cfg.baseline,
                                ctx.splits.defense_images, cfg.seed, hinge_beta).cpu()
    return ctx.store.get_or_build(REVERSE.name, spec, build)


def neural_cleanse_result(ctx: Context, backdoor: Backdoor) -> dict:
    """Neural Cleanse's reversal and outlier test on a backdoored model, cached."""
    cfg = ctx.cfg
    spec = NEURAL_CLEANSE.spec(cfg, backdoor.key)

    def build():
        return neural_cleanse(ctx, backdoor.model(ctx), cfg.neural_cleanse,
                              ctx.splits.defense_images, cfg.seed)
    return ctx.store.get_or_build(NEURAL_CLEANSE.name, spec, build)


def neural_cleanse_row(ctx: Context, backdoor: Backdoor) -> dict:
    """04's Neural Cleanse row for one backdoored model: the target class's mask L1 beside
    the median over classes, its MAD anomaly index, the classes flagged, and the size of the
    crop that neural_cleanse_crop pastes (its mask's bounding box, crop_to_mask)."""
    nc = neural_cleanse_result(ctx, backdoor)
    crop, _ = crop_to_mask(nc["masks"][backdoor.target], nc["patterns"][backdoor.target])
    return {"trigger": backdoor.trigger, "target_mask_l1": float(nc["l1"][backdoor.target]),
            "crop_height": crop.shape[1], "crop_width": crop.shape[2],
            "median_mask_l1": float(nc["l1"].median()),
            "target_anomaly_index": float(nc["anomaly"][backdoor.target]),
            "flagged_classes": nc["flagged"].nonzero().flatten().tolist()}


DEFENSE_METHODS = tuple(METHODS)


@dataclass(frozen=True)
class Retraining:
    """What one retraining of a comparison pastes: `method` (a name of methods.METHODS), its
    trigger `source` (None: nothing pasted) and `spec` (what identifies the source in the
    retraining's key); `beta` for a MESA sub-model, `start` for a baseline start, else None.
    Each is retrained from one or more seeds (retraining_seeds)."""
    method: str
    source: object
    spec: dict
    beta: float | None = None
    start: int | None = None

    def label(self, backdoor: Backdoor, seed: int) -> str:
        """Its progress bar's label."""
        return (f"retrain {method_label(self.method, self.beta)}, trigger {backdoor.trigger}, "
                f"seed {seed}")


def defense_sources(ctx: Context, backdoor: Backdoor, methods=DEFAULT_METHODS) -> list:
    """The Retrainings of 04's comparison for one backdoored model, for each of `methods`
    (only those are built): mesa (one per beta of the staircase), mesa_mixture (uniform
    gamma), mesa_entropy_mixture (Algorithm 1's gamma: mesa.entropy_weights; left out, with a
    warning, when every sub-model is empty), baseline (one per start), neural_cleanse (its
    reversal for the target class, at its place), neural_cleanse_crop (that reversal cut to
    its mask's bounding box, pasted at random places), ideal (the original trigger), and the
    controls finetune (no trigger: source None, nothing pasted) and random_patch (uniformly
    random 3x3 patches); mesa_free (09): the uniform mixture of the size-free staircase."""
    unknown = sorted(set(methods) - set(DEFENSE_METHODS))
    if unknown:
        raise ValueError(f"unknown defence methods {unknown}; choose from {DEFENSE_METHODS}")
    runs = []
    if {"mesa", "mesa_mixture", "mesa_entropy_mixture"} & set(methods):
        bank = staircase_bank(ctx, backdoor)
        members = [asdict(m) for m in bank.members]
    if "mesa" in methods:
        runs += [Retraining("mesa", bank.sampler([member]),
                            {"kind": "mesa", "bank": bank.key, "members": [asdict(member)]},
                            beta=member.beta)
                 for member in bank.members]
    if "mesa_mixture" in methods:
        runs.append(Retraining("mesa_mixture", bank.sampler(),
                               {"kind": "mesa", "bank": bank.key, "members": members}))
    if "mesa_entropy_mixture" in methods:
        entropy_mixture = bank.entropy_sampler()
        if entropy_mixture is None:
            warnings.warn(f"trigger {backdoor.trigger}: every MESA sub-model is empty (mean "
                          "target softmax below its beta), so Algorithm 1's mixture is undefined "
                          "and mesa_entropy_mixture is left out for this trigger")
        else:
            runs.append(Retraining("mesa_entropy_mixture", entropy_mixture,
                                   {"kind": "mesa", "bank": bank.key, "members": members,
                                    "weights": entropy_mixture.weights.tolist()}))
    if "mesa_free" in methods:
        free = staircase_bank(ctx, backdoor, size_free=True)
        runs.append(Retraining("mesa_free", free.sampler(),
                               {"kind": "mesa", "bank": free.key,
                                "members": [asdict(m) for m in free.members]}))
    if "baseline" in methods:
        runs += [Retraining("baseline", *patch_source(ctx, trigger), start=start)
                 for start, trigger in enumerate(baseline_triggers(ctx, backdoor))]
    if {"neural_cleanse", "neural_cleanse_crop"} & set(methods):
        nc = neural_cleanse_result(ctx, backdoor)
        nc_mask, nc_pattern = (nc["masks"][backdoor.target].to(ctx.device),
                               nc["patterns"][backdoor.target].to(ctx.device))
        nc_spec = {"kind": "neural_cleanse",
                   "reversal": NEURAL_CLEANSE.key(ctx.cfg, backdoor.key)}
    if "neural_cleanse" in methods:
        runs.append(Retraining("neural_cleanse", MaskSource(nc_mask, nc_pattern), nc_spec))
    if "neural_cleanse_crop" in methods:
        runs.append(Retraining("neural_cleanse_crop",
                               MaskedPatchPaster(*crop_to_mask(nc_mask, nc_pattern)),
                               {**nc_spec, "kind": "neural_cleanse_crop", "threshold": 0.5}))
    if "ideal" in methods:
        runs.append(Retraining("ideal", backdoor.source(),
                               {"kind": "original", "trigger": backdoor.trigger}))
    if "finetune" in methods:
        runs.append(Retraining("finetune", None, {"kind": "none"}))
    if "random_patch" in methods:
        runs.append(Retraining("random_patch", RandomPatchSource((3, 3)),
                               {"kind": "random_patch", "size": [3, 3]}))
    return runs


def patch_source(ctx: Context, trigger) -> tuple:
    """(source, spec) of a fixed reversed 3x3 trigger (3, 3, 3) pasted at random places."""
    return (TriggerPaster(trigger.to(ctx.device)),
            {"kind": "patch", "trigger": trigger.flatten().tolist()})


def retraining_seeds(cfg, method: str) -> list:
    """The retraining seeds of a method: cfg.seed for each baseline start (its starts are its
    repeats), cfg.seed .. cfg.seed + defense_seeds - 1 for every other method."""
    count = 1 if method == "baseline" else cfg.defense_seeds
    return [cfg.seed + k for k in range(count)]


def retrain_row(ctx: Context, backdoor: Backdoor, run: Retraining, seed: int,
                holdout: int = 0) -> dict:
    """One run of a comparison as a tidy row: `run` retrained (retrain) from `seed`, its
    before/after ASR and clean accuracy on the eval split, asr_after_low/high the 95% Wilson
    interval of its after-defence ASR; with `holdout`, also its holdout_asr and
    holdout_clean_accuracy on the defender's held-out images."""
    record = retrain(ctx, backdoor, run.source, run.spec, seed, desc=run.label(backdoor, seed),
                     holdout=holdout)
    return _run_row(ctx, backdoor, run, seed, record)


def _run_row(ctx: Context, backdoor: Backdoor, run: Retraining, seed: int, record: dict) -> dict:
    low, high = eval_asr_interval(ctx, record["asr"])
    row = {"trigger": backdoor.trigger, "method": run.method, "beta": run.beta,
           "start": run.start, "seed": seed, "asr_before": backdoor.asr,
           "asr_after": record["asr"], "asr_after_low": low, "asr_after_high": high,
           "clean_before": backdoor.clean_accuracy, "clean_after": record["clean_accuracy"]}
    if "holdout_asr" in record:
        row.update(holdout_asr=record["holdout_asr"],
                   holdout_clean_accuracy=record["holdout_clean_accuracy"])
    return row


def compare_defenses(ctx: Context, backdoor: Backdoor) -> list:
    """The defences of cfg.defense_methods on one backdoored model (defense_sources), each
    retrained alike from each of its retraining_seeds (retrain_many: retrain_bank at once): tidy
    rows of before/after ASR and clean accuracy, one per run (seed: the retraining's);
    asr_after_low/high is the 95% Wilson interval of each run's after-defence ASR."""
    runs = [(run, seed) for run in defense_sources(ctx, backdoor, ctx.cfg.defense_methods)
            for seed in retraining_seeds(ctx.cfg, run.method)]
    records = retrain_many(ctx, backdoor, [(run.source, run.spec, seed, run.label(backdoor, seed))
                                           for run, seed in runs])
    return [_run_row(ctx, backdoor, run, seed, record)
            for (run, seed), record in zip(runs, records)]
