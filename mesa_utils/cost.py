"""A cost model of a run: how many images each stage passes through the classifier, so that one
measured training step on a device predicts the minutes of the clean model and of a unit there.

Counted in training-image equivalents: one image forward and backward through the ResNet-18 is
1; a generator, reversal or Neural Cleanse step that backpropagates to its pasted triggers
through the frozen classifier counts its images as 1 each too (the backward pass to the input
costs about as much as one to the weights); a forward-only evaluation counts 1/3 (a backward
pass costs about twice a forward one). What the model leaves out (the generators' own small
networks, MINE, data movement, Python overhead) makes its predictions lower bounds where those
matter, e.g. on a GPU with small batches.
"""
from .defense import retraining_seeds

FORWARD_SHARE = 1 / 3       # a forward pass against a forward and backward one


def retrainings_per_unit(cfg) -> int:
    """How many retrainings one trigger's defence unit runs (04's comparison: the staircase's
    sub-models one by one under "mesa", every baseline start, one source for the others), each
    from its retraining seeds."""
    sources = {"mesa": len(cfg.mesa.betas), "baseline": cfg.baseline.starts}
    return sum(sources.get(method, 1) * len(retraining_seeds(cfg, method))
               for method in cfg.defense_methods)


def stage_images(cfg, classes: int = 10) -> dict:
    """Training-image equivalents of each stage: {"clean model": n} once per run, and per
    trigger {"attack", "detection", "staircase" (twice with the size-free MESA), "baseline",
    "neural cleanse" (when one of its methods is compared), "retrainings", "evaluation"}.
    classes: the dataset's (10: CIFAR-10)."""
    train = cfg.train_subset or 50000
    defender = (cfg.test_subset or 10000) - cfg.eval_size
    det, mesa, base, nc = cfg.detection, cfg.mesa, cfg.baseline, cfg.neural_cleanse
    retrainings = retrainings_per_unit(cfg)
    per_trigger = {
        "attack": cfg.attack.epochs * train,
        "detection": det.steps * classes * det.batch_size,
        "staircase": mesa.steps * len(mesa.betas) * mesa.batch_size
                     * (1 + ("mesa_free" in cfg.defense_methods)),   # and its size-free twin
        "baseline": base.steps * base.starts * base.batch_size,
        "retrainings": retrainings * cfg.defense.epochs * defender,
        # clean and triggered eval split after every retraining and attack; each generator's
        # sampled triggers (detection: held-out split and training split)
        "evaluation": FORWARD_SHARE * (2 * cfg.eval_size * (retrainings + 1)
                                       + classes * (cfg.eval_size + det.eval_samples)
                                       + len(mesa.betas) * mesa.eval_samples)}
    if {"neural_cleanse", "neural_cleanse_crop"} & set(cfg.defense_methods):
        per_trigger["neural cleanse"] = nc.steps * classes * nc.batch_size
    return {"clean model": cfg.clean.epochs * train, "per trigger": per_trigger}


def predicted_minutes(cfg, seconds_per_image: float, classes: int = 10) -> dict:
    """stage_images in minutes at `seconds_per_image` (one training image's measured time):
    {"clean model", "per trigger" (total), "per trigger by stage": {...}, "run": the clean
    model and every trigger of cfg}."""
    images = stage_images(cfg, classes)
    by_stage = {stage: n * seconds_per_image / 60 for stage, n in images["per trigger"].items()}
    clean = images["clean model"] * seconds_per_image / 60
    per_trigger = sum(by_stage.values())
    return {"clean model": clean, "per trigger": per_trigger, "per trigger by stage": by_stage,
            "run": clean + per_trigger * len(cfg.triggers)}
