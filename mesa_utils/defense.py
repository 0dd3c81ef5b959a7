"""Defences: retraining with a trigger source, the single-trigger baseline, Neural Cleanse.

Retraining (paper, eq. 5) fine-tunes the backdoored model on the defender's 8K split, pasting
a trigger from the source on each image with probability r and keeping the TRUE labels, so the
model unlearns the trigger -> target association. The sources compared in 04_defense:
MESA sub-models (one per beta) and their uniform mixture; the baseline's single reversed
trigger (raw 3x3 pixels optimised toward the target, several random starts); Neural Cleanse's
reversed mask + pattern; and the original trigger itself (the ideal defence).
"""
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import to_dict
from .data import normalize
from .mesa import GeneratorSampler, Member, mesa_bank
from .models import frozen
from .store import spec_key
from .intervals import bootstrap_interval
from .train import (Context, FiniteGuard, attack_success_rate, autocast, backdoor_spec,
                    backdoored_model, clean_accuracy, eval_asr_interval, fit, original_source,
                    state_dict_cpu)
from .triggers import TriggerPaster, apply_trigger


# ---------------------------------------------------------------------------------------------
# Baseline: single reversed trigger, several random starts optimised as one batch

def reverse_triggers(ctx: Context, classifier, target, bcfg, images, seed=0) -> torch.Tensor:
    """bcfg.starts raw triggers (S, 3, 3, 3) in [0, 1] optimised toward `target`.

    Each start: uniform random init, SGD (lr, momentum) on the cross-entropy toward the target
    of its trigger pasted on a batch of images, clipped to [0, 1] after each step.
    """
    device, s, b = ctx.device, bcfg.starts, bcfg.batch_size
    classifier = frozen(classifier)
    generator = torch.Generator(device).manual_seed(seed)
    pixels = torch.rand(s, 3, 3, 3, device=device, generator=generator).requires_grad_(True)
    optimizer = torch.optim.SGD([pixels], lr=bcfg.lr, momentum=bcfg.momentum)
    labels = torch.full((s * b,), target, device=device)
    guard = FiniteGuard("baseline reversal", bcfg.steps,
                        f"Lower baseline.lr (now {bcfg.lr:g}).", device)
    for step in tqdm(range(bcfg.steps), desc="baseline reversal", leave=False):
        index = torch.randint(len(images), (s * b,), device=device, generator=generator)
        x = normalize(images[index], ctx.splits.mean, ctx.splits.std)
        x = apply_trigger(x, pixels.repeat_interleave(b, 0), generator=generator,
                          mean=ctx.splits.mean, std=ctx.splits.std)
        with autocast(device, ctx.amp):
            logits = classifier(x)
        # Sum of per-start means: each start gets exactly its own gradient.
        loss = F.cross_entropy(logits.float(), labels, reduction="none").view(s, b).mean(1).sum()
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
    """Neural Cleanse's trigger: x' = (1 - mask) * x + mask * pattern (pixel space), as a
    trigger source on normalised images. mask (1, H, W) and pattern (3, H, W) in [0, 1]."""

    def __init__(self, mask, pattern, mean, std):
        self.mask = mask
        self.pattern = (pattern - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    def __call__(self, images, generator=None):
        return (1 - self.mask) * images + self.mask * self.pattern


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
    mean, std = ctx.splits.mean.view(1, -1, 1, 1), ctx.splits.std.view(1, -1, 1, 1)
    hits = torch.zeros(num_classes, device=device)
    guard = FiniteGuard("Neural Cleanse", ncfg.steps,
                        f"Lower neural_cleanse.lr (now {ncfg.lr:g}).", device)
    for step in tqdm(range(ncfg.steps), desc="Neural Cleanse", leave=False):
        index = torch.randint(len(images), (num_classes * b,), device=device, generator=generator)
        x = normalize(images[index], ctx.splits.mean, ctx.splits.std)
        mask = torch.tanh(mask_param) / 2 + 0.5                            # (C, 1, H, W)
        pattern = (torch.tanh(pattern_param) / 2 + 0.5 - mean) / std        # normalised
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
                best_pattern[better] = (pattern * std + mean)[better]
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

def retrain(ctx: Context, trigger_id, source, source_spec: dict, seed=0, desc="defence") -> dict:
    """Fine-tune the backdoored model of `trigger_id` with `source` (true labels kept), cached.

    Returns a record with clean_accuracy and asr (of the ORIGINAL trigger) on the 2K eval
    split, the training history, and the retrained weights (unless cfg.save_retrained is off).
    """
    cfg = ctx.cfg
    spec = {"stage": "defense", "parent": spec_key(backdoor_spec(ctx, trigger_id)),
            "source": source_spec, "train": to_dict(cfg.defense), "seed": seed}

    def build():
        model, _ = backdoored_model(ctx, trigger_id)
        history = fit(ctx, model, ctx.splits.defense_images, ctx.splits.defense_labels,
                      cfg.defense, "defense", source=source, target=None, seed=seed, desc=desc)
        record = {"history": history,
                  "clean_accuracy": clean_accuracy(ctx, model, ctx.splits.eval_images,
                                                   ctx.splits.eval_labels),
                  "asr": attack_success_rate(ctx, model, ctx.splits.eval_images,
                                             ctx.splits.eval_labels,
                                             original_source(ctx, trigger_id), cfg.target)}
        if cfg.save_retrained:
            record["state_dict"] = state_dict_cpu(model)
        return record
    return ctx.store.get_or_build("defense", spec, build)


def mesa_members(ctx: Context) -> list:
    """The staircase of the defence: one sub-model per beta at the profile's alpha."""
    return [Member(beta, ctx.cfg.mesa.alpha, ctx.cfg.target) for beta in ctx.cfg.mesa.betas]


def baseline_triggers(ctx: Context, trigger_id) -> torch.Tensor:
    """The baseline's reversed triggers (starts, 3, 3, 3) for a backdoored model, cached."""
    cfg = ctx.cfg
    spec = {"stage": "reverse", "parent": spec_key(backdoor_spec(ctx, trigger_id)),
            "target": cfg.target, "baseline": to_dict(cfg.baseline), "seed": cfg.seed}

    def build():
        model, _ = backdoored_model(ctx, trigger_id)
        return reverse_triggers(ctx, model, cfg.target, cfg.baseline, ctx.splits.defense_images,
                                cfg.seed).cpu()
    return ctx.store.get_or_build("reverse", spec, build)


def neural_cleanse_result(ctx: Context, trigger_id) -> dict:
    """Neural Cleanse's reversal and outlier test on a backdoored model, cached."""
    cfg = ctx.cfg
    spec = {"stage": "neural_cleanse", "parent": spec_key(backdoor_spec(ctx, trigger_id)),
            "neural_cleanse": to_dict(cfg.neural_cleanse), "seed": cfg.seed}

    def build():
        model, _ = backdoored_model(ctx, trigger_id)
        return neural_cleanse(ctx, model, cfg.neural_cleanse, ctx.splits.defense_images, cfg.seed)
    return ctx.store.get_or_build("neural_cleanse", spec, build)


def compare_defenses(ctx: Context, trigger_id) -> list:
    """Every defence of 04_defense on one trigger: tidy rows of before/after ASR and accuracy.

    Methods: mesa (one row per beta), mesa_mixture (uniform gamma), baseline (one row per
    start), neural_cleanse (its reversal for the target class), ideal (original trigger).
    asr_after_low/high: the 95% Wilson interval of each run's after-defence ASR.
    """
    cfg, splits = ctx.cfg, ctx.splits
    model, attack = backdoored_model(ctx, trigger_id)
    parent = spec_key(backdoor_spec(ctx, trigger_id))
    members = mesa_members(ctx)
    generators, bank = mesa_bank(ctx, model, parent, members, cfg.mesa, cfg.seed,
                                 desc=f"MESA {trigger_id}")
    bank_key = bank["key"]
    runs = []   # (method, beta, start, source, source spec)
    for i, member in enumerate(members):
        runs.append(("mesa", member.beta, None,
                     GeneratorSampler(generators, [i], mean=splits.mean, std=splits.std),
                     {"kind": "mesa", "bank": bank_key, "members": [i]}))
    runs.append(("mesa_mixture", None, None,
                 GeneratorSampler(generators, mean=splits.mean, std=splits.std),
                 {"kind": "mesa", "bank": bank_key, "members": list(range(len(members)))}))
    for start, trigger in enumerate(baseline_triggers(ctx, trigger_id)):
        runs.append(("baseline", None, start,
                     TriggerPaster(trigger.to(ctx.device), splits.mean, splits.std),
                     {"kind": "patch", "trigger": trigger.flatten().tolist()}))
    nc = neural_cleanse_result(ctx, trigger_id)
    runs.append(("neural_cleanse", None, None,
                 MaskSource(nc["masks"][cfg.target].to(ctx.device),
                            nc["patterns"][cfg.target].to(ctx.device), splits.mean, splits.std),
                 {"kind": "neural_cleanse", "parent": parent,
                  "neural_cleanse": to_dict(cfg.neural_cleanse)}))
    runs.append(("ideal", None, None, original_source(ctx, trigger_id),
                 {"kind": "original", "trigger": trigger_id}))
    rows = []
    for method, beta, start, source, source_spec in runs:
        record = retrain(ctx, trigger_id, source, source_spec, cfg.seed,
                         desc=f"retrain {method_label(method, beta)}, trigger {trigger_id}")
        low, high = eval_asr_interval(ctx, record["asr"])
        rows.append({"trigger": trigger_id, "method": method, "beta": beta, "start": start,
                     "asr_before": attack["asr"], "asr_after": record["asr"],
                     "asr_after_low": low, "asr_after_high": high,
                     "clean_before": attack["clean_accuracy"],
                     "clean_after": record["clean_accuracy"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Summary beside the paper (section 4.3 and Fig. 4: 51 triggers, CIFAR-10, target 0)

PAPER_RESULTS = {
    "before defence": "ASR 92.3-99.8% (mean 98.7%)",
    "mesa beta=0.5": "worst <= 9.1%",
    "mesa beta=0.8": "worst <= 9.1%",
    "mesa beta=0.9": "mean 3.4%, worst 5.9%",
    "mesa_mixture": "worst <= 9.1%",
    "baseline": "2.4-51.4% over runs",
    "neural_cleanse": "(not in the paper)",
    "ideal": "mean 2.4%",
}


def method_label(method, beta) -> str:
    return f"mesa beta={beta:g}" if method == "mesa" else method


def summarize(df):
    """Per method: mean after-defence ASR (%) over triggers (and baseline starts) with a 95%
    bootstrap interval over its runs, the worst run, the mean clean-accuracy change (points),
    beside the paper's numbers. "worst" grows with the number of runs: compare it only
    between methods with as many runs (column `runs`)."""
    import pandas as pd
    labelled = df.assign(label=[method_label(m, b) for m, b in zip(df.method, df.beta)])
    order = ["mesa beta=" + f"{b:g}" for b in sorted(df.beta.dropna().unique())]
    order += ["mesa_mixture", "baseline", "neural_cleanse", "ideal"]
    before = df.drop_duplicates("trigger")

    def asr_columns(asr):
        low, high = bootstrap_interval(asr.to_numpy())
        return {"mean_asr_%": 100 * asr.mean(), "mean_asr_low_%": 100 * low,
                "mean_asr_high_%": 100 * high, "worst_asr_%": 100 * asr.max()}
    rows = [{"method": "before defence", "runs": len(before), **asr_columns(before.asr_before),
             "clean_change_pts": 0.0, "paper": PAPER_RESULTS["before defence"]}]
    for label in order:
        part = labelled[labelled.label == label]
        if len(part):
            rows.append({"method": label, "runs": len(part), **asr_columns(part.asr_after),
                         "clean_change_pts": 100 * (part.clean_after - part.clean_before).mean(),
                         "paper": PAPER_RESULTS.get(label, "")})
    return pd.DataFrame(rows).round(2)
