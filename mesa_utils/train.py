"""Training and metrics: the clean model, the backdoor attack, clean accuracy and ASR.

One SGD loop (`fit`) serves clean training, the attack (poison + relabel) and the defence
(poison, true labels); `fit_bank` runs it for K models at once (the defence's retrainings).
`Context` bundles what every stage needs: config, data on the device, device, autocast dtype and
the artefact store. bf16 autocast is used where the hardware has
native bf16 (CUDA, or CPUs with AVX512-BF16/AMX): on a CPU without it bf16 was 2.8x *slower*
than fp32 for ResNet-18 (measured on the 2-core Xeon of the README), so "auto" leaves it off.
"""
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm as tqdm_text
from tqdm.auto import tqdm

from .config import Config, TrainConfig, to_dict
from .data import STATS, Loader, Splits, prepare_splits, to_pixels
from .intervals import wilson_interval
from .models import ResNet18, ResNetBank
from .stages import BACKDOOR, BLENDED, CLEAN
from .store import NonFiniteError, Store, shown, spec_key
from .triggers import BlendedTrigger, TriggerPaster, blend_pattern, poison, trigger_pattern


def progress(iterable, desc: str, total=None):
    """A transient tqdm bar over `iterable` (widgets in Jupyter), off when $TQDM_DISABLE is 1 or
    true: tqdm.notebook overrides that variable with its own default, so it is read here. With
    $MESA_TERMINAL_PROGRESS = 1 (run_all.sh sets it) a notebook kernel draws the bar as text on
    the terminal that started it (the kernel's own stderr) instead, and none in the notebook:
    under papermill a widget only ever shows its first frame."""
    disable = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    terminal = _kernel_terminal()
    if terminal is not None:
        return tqdm_text(iterable, desc=desc, total=total, leave=False, disable=disable,
                         file=terminal, mininterval=1.0)
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=disable)


@functools.cache
def _kernel_terminal():
    """With $MESA_TERMINAL_PROGRESS = 1 in a notebook kernel: a stream onto the stderr the
    kernel was started with, else None. ipykernel forwards what reaches fd 2 into the notebook
    when it captures low-level output; it then keeps the terminal's stream as
    sys.stderr.fileno(). Without that capture (e.g. under pytest) fd 2 is the terminal."""
    if os.environ.get("MESA_TERMINAL_PROGRESS") != "1" or sys.stderr is sys.__stderr__:
        return None
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):      # io.UnsupportedOperation is both
        return sys.__stderr__


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; "
                         "use device='auto' or 'cpu'")
    return device


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, mode: str = "auto"):
    """torch.bfloat16 when autocast should be used on `device`, else None."""
    if mode == "off":
        return None
    if mode == "on":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@dataclass
class Context:
    """What every stage needs; `setup(cfg)` builds it."""
    cfg: Config
    splits: Splits
    device: torch.device
    amp: object          # torch.bfloat16 or None
    store: Store

    def new_classifier(self) -> torch.nn.Module:
        model = ResNet18(self.splits.num_classes, self.cfg.width, *STATS[self.cfg.dataset])
        return model.to(self.device, memory_format=torch.channels_last)

    def load_classifier(self, state_dict) -> torch.nn.Module:
        model = self.new_classifier()
        model.load_state_dict(state_dict)
        return model


def setup(cfg: Config, store: Store | None = None, cifar=None) -> Context:
    """Load the data onto the configured device and open the artefact store."""
    device = get_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":   # every loop has fixed shapes: cuDNN may pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    return Context(cfg, prepare_splits(cfg, device, cifar), device, amp_dtype(device, cfg.amp),
                   store or Store())


# ---------------------------------------------------------------------------------------------
# Divergence: every training loop stops on the first non-finite loss or parameter

CHECK_EVERY = 50    # steps between reads of the on-device flag (a host sync on a GPU)


class FiniteGuard:
    """Watches a training loop for NaN/inf without a host synchronisation per step.

    `watch(step, *values)` keeps, on the device, the first step at which a value was not
    finite; the flag is read every CHECK_EVERY steps and by `finish(named_tensors)`, which
    also checks the final parameters. Both raise NonFiniteError naming the stage, the step
    and `advice` (the setting to change), before anything is stored.
    """

    def __init__(self, stage: str, steps: int, advice: str, device):
        self.stage, self.steps, self.advice = stage, steps, advice
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def watch(self, step: int, *values):
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in values]).any()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if (step + 1) % CHECK_EVERY == 0:
            self._raise_if_bad()

    def _raise_if_bad(self):
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteError(f"{self.stage}: the loss became non-finite (NaN or inf) at "
                                 f"step {step + 1} of {self.steps}; training diverged and "
                                 f"nothing was stored. {self.advice}")

    def finish(self, named_tensors=()):
        self._raise_if_bad()
        bad = [name for name, t in named_tensors
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteError(f"{self.stage}: after {self.steps} steps, {', '.join(bad[:3])} "
                                 f"hold non-finite values; training diverged and nothing was "
                                 f"stored. {self.advice}")


# ---------------------------------------------------------------------------------------------
# Training

def _lr_factor(schedule, step, total):
    """Multiplier of the peak learning rate at optimiser step `step` of `total`."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, int(0.2 * total))          # one-cycle: linear up 20%, linear down to 0
    # max(1, ...): a run of a single step has no decay phase (its scheduler still steps once)
    return step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def fit(ctx: Context, model, images, labels, cfg: TrainConfig, setting: str, source=None,
        target=None, seed=0, desc="train") -> list:
    """SGD on uint8 images (N, H, W, C) / labels (N,) held on the device, in place.

    With `source` (a trigger source, see triggers.poison) each image of each batch is
    triggered with probability cfg.poison_rate and relabelled to `target` (attack) or keeps
    its label (target=None: defence). `setting` is cfg's config section ("clean", "attack",
    "defense"), named when training diverges (NonFiniteError). Returns per-epoch dicts of
    loss, accuracy, poisoned; counters stay on the device until the end of each epoch.
    """
    return _fit(ctx, model, images, labels, cfg, setting, [source], [seed], target, desc,
                banked=False)[0]


def fit_bank(ctx: Context, bank: ResNetBank, images, labels, cfg: TrainConfig, setting: str,
             sources: list, seeds: list, target=None, desc="train") -> list:
    """`fit` of the K members of `bank` in one pass: member k sees exactly the batches and the
    pasted triggers that fit(member k, source=sources[k], seed=seeds[k]) would, and ends with
    its weights to float rounding (models.ResNetBank). Returns one history per member."""
    if not len(sources) == len(seeds) == bank.k:
        raise ValueError(f"a bank of {bank.k} models needs {bank.k} sources and seeds, got "
                         f"{len(sources)} and {len(seeds)}")
    return _fit(ctx, bank, images, labels, cfg, setting, sources, seeds, target, desc,
                banked=True)


def _fit(ctx, model, images, labels, cfg, setting, sources, seeds, target, desc, banked):
    """The SGD loop of fit and fit_bank: one batch stream and poison generator per seed; with
    `banked`, the members' batches stacked (K, B, ...) for the bank, else the one model's."""
    loaders = [Loader(images, labels, cfg.batch_size, shuffle=True, augment=cfg.augment,
                      drop_last=len(images) > cfg.batch_size, seed=seed) for seed in seeds]
    poison_generators = [torch.Generator(ctx.device).manual_seed(seed + 1) for seed in seeds]
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loaders[0])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(_lr_factor, cfg.schedule, total=total))
    guard = FiniteGuard(desc, total, f"Lower {setting}.lr (now {cfg.lr:g}).", ctx.device)
    histories, step = [[] for _ in seeds], 0
    model.train()
    for epoch in range(cfg.epochs):
        loss_sum, correct, poisoned = (torch.zeros(len(seeds), device=ctx.device)
                                       for _ in range(3))
        seen = 0
        bar = progress(zip(*loaders), f"{desc} {epoch + 1}/{cfg.epochs}", total=len(loaders[0]))
        for batches in bar:
            xs, ys = [], []
            for i, (x, y) in enumerate(batches):
                if sources[i] is not None and cfg.poison_rate > 0:
                    x, y, mask = poison(x, y, sources[i], cfg.poison_rate, target,
                                        poison_generators[i])
                    poisoned[i] += mask.sum()
                xs.append(x)
                ys.append(y)
            x, y = (torch.stack(xs), torch.stack(ys)) if banked else (xs[0], ys[0])
            with autocast(ctx.device, ctx.amp):
                logits = model(x)
                if banked:
                    # each member's mean loss, summed: each member's gradient is its own
                    member_losses = F.cross_entropy(
                        logits.flatten(0, 1), y.flatten(), reduction="none",
                        label_smoothing=cfg.label_smoothing).view(len(seeds), -1).mean(1)
                    loss = member_losses.sum()
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    member_losses = loss.view(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            guard.watch(step, loss)
            loss_sum += member_losses.detach().float() * y.shape[-1]
            correct += (logits.argmax(-1) == y).sum(-1)
            seen += y.shape[-1]
            step += 1
            if step % CHECK_EVERY == 0:
                bar.set_postfix(loss=f"{float(loss_sum.sum()) / seen:.3f}")
        for i, history in enumerate(histories):
            history.append({"epoch": epoch + 1, "loss": float(loss_sum[i]) / seen,
                            "train_accuracy": float(correct[i]) / seen,
                            "poisoned": int(poisoned[i])})
    model.eval()
    with torch.no_grad(), autocast(ctx.device, ctx.amp):
        # Weights can stay finite yet so large that the outputs overflow: check both.
        last_outputs = model(x).float()
    guard.finish([*model.state_dict().items(), ("the outputs on the last batch", last_outputs)])
    return histories


# ---------------------------------------------------------------------------------------------
# Metrics

@torch.no_grad()
def probabilities(ctx: Context, model, images, source=None, seed=0) -> torch.Tensor:
    """Softmax (N, classes) for uint8 images (N, H, W, C), each first triggered by `source`.

    Raises NonFiniteError when any probability is NaN or inf: a broken model must not be
    scored (argmax of a NaN row is class 0, which would read as a perfect attack on 0).
    """
    model.eval()
    generator = torch.Generator(ctx.device).manual_seed(seed)
    out = [torch.empty(0, ctx.splits.num_classes, device=ctx.device)]
    for start in range(0, len(images), ctx.cfg.eval_batch_size):
        x = to_pixels(images[start:start + ctx.cfg.eval_batch_size])
        if source is not None:
            x = source(x, generator)
        with autocast(ctx.device, ctx.amp):
            out.append(model(x).float().softmax(1))
    probs = torch.cat(out)
    bad = int((~torch.isfinite(probs)).any(1).sum())
    if bad:
        raise NonFiniteError(f"the model's softmax is NaN or inf on {bad} of {len(probs)} "
                             "images: it is broken (diverged training or a corrupt artefact) "
                             "and cannot be scored")
    return probs


def clean_accuracy(ctx: Context, model, images, labels) -> float:
    """Share of images classified correctly, in [0, 1]."""
    return float((probabilities(ctx, model, images).argmax(1) == labels).float().mean())


def attack_stats(ctx: Context, model, images, labels, source, target, seed=0) -> dict:
    """{"asr", "target_softmax"} of `source` on the images whose true label is not `target`.

    asr in [0, 1]: share of triggered images classified as `target`; target_softmax: their
    mean softmax of `target`. Each image gets its own random trigger position.
    """
    keep = labels != target
    if not keep.any():
        raise ValueError(f"no image outside the target class {target} to measure ASR on")
    probs = probabilities(ctx, model, images[keep], source, seed)
    return {"asr": float((probs.argmax(1) == target).float().mean()),
            "target_softmax": float(probs[:, target].mean())}


def attack_success_rate(ctx: Context, model, images, labels, source, target, seed=0) -> float:
    """ASR in [0, 1] of `source` (target-class images excluded), see attack_stats."""
    return attack_stats(ctx, model, images, labels, source, target, seed)["asr"]


def eval_asr_interval(ctx: Context, asr: float) -> tuple:
    """95% Wilson interval (low, high) of an ASR measured on the 2K eval split, i.e. on its
    images outside the target class (~1,800 in CIFAR-10: +-2.3 points at 50%, -1.0/+1.1 at 5%)."""
    trials = int((ctx.splits.eval_labels != ctx.cfg.target).sum())
    return wilson_interval(round(asr * trials), trials)


# ---------------------------------------------------------------------------------------------
# Cached models: the clean model and the backdoored models of 01_attack

def clean_spec(ctx: Context) -> dict:
    """The clean model's spec: stages.CLEAN's fields, the data's fingerprint (so that a model
    trained or measured on other data is never reused; every later artefact chains to this
    one through its parent) and the autocast dtype it trained under."""
    return CLEAN.spec(ctx.cfg, data=ctx.splits.fingerprint, amp_dtype=str(ctx.amp))


def clean_model(ctx: Context):
    """(model, record): the clean classifier of this profile, trained once and cached."""
    def build():
        torch.manual_seed(ctx.cfg.seed)
        model = ctx.new_classifier()
        history = fit(ctx, model, ctx.splits.train_images, ctx.splits.train_labels,
                      ctx.cfg.clean, "clean", seed=ctx.cfg.seed, desc="clean model")
        return {"state_dict": state_dict_cpu(model),
                "history": history,
                "clean_accuracy": clean_accuracy(ctx, model, ctx.splits.eval_images,
                                                 ctx.splits.eval_labels)}
    record = ctx.store.get_or_build(CLEAN.name, clean_spec(ctx), build)
    return ctx.load_classifier(record["state_dict"]).eval(), record


def backdoor_spec(ctx: Context, trigger_id: int, attack_seed: int = 0) -> dict:
    return BACKDOOR.spec(ctx.cfg, spec_key(clean_spec(ctx)), trigger=trigger_id,
                         attack_seed=attack_seed)


def original_source(trigger_id: int, trigger_set: str = "black_white", blend_ratio: float = 0.0):
    """The attacker's trigger as a trigger source: a 3x3 trigger of `trigger_set` pasted at a
    random position per image, or with trigger_set "blended" the Blended attack's noise image
    number `trigger_id` mixed in at `blend_ratio`."""
    if trigger_set == "blended":
        return BlendedTrigger(blend_pattern(trigger_id), blend_ratio)
    return TriggerPaster(trigger_pattern(trigger_set, trigger_id))


@dataclass(frozen=True)
class Backdoor:
    """A backdoored model as a value that later stages are given (never rebuild).

    key: its store key, the `parent` of every artefact made from it (generators, reversals,
    retrained models). record: state_dict, history, and clean_accuracy and asr in [0, 1] on
    the 2K eval split. trigger_set: where `trigger` is from (triggers.trigger_pattern), or
    "blended" for the Blended attack (trigger: its noise image's seed, blended at blend_ratio).
    """
    trigger: int
    target: int
    key: str
    record: dict
    trigger_set: str = "black_white"
    blend_ratio: float = 0.0

    @property
    def asr(self) -> float:
        return self.record["asr"]

    @property
    def clean_accuracy(self) -> float:
        return self.record["clean_accuracy"]

    def model(self, ctx: Context) -> torch.nn.Module:
        """A fresh copy of the backdoored classifier in eval mode (retraining changes it)."""
        return ctx.load_classifier(self.record["state_dict"]).eval()

    def source(self) -> TriggerPaster:
        """Its original trigger as a trigger source."""
        return original_source(self.trigger, self.trigger_set, self.blend_ratio)

    @property
    def name(self) -> str:
        """How tables name it: the trigger id, or "blended"."""
        return "blended" if self.trigger_set == "blended" else str(self.trigger)


def _attacked(ctx: Context, spec: dict, source, seed: int, desc: str) -> dict:
    """The record of the clean model fine-tuned with `source` under cfg.attack (poisoned
    images relabelled to cfg.target), trained once and cached under `spec`."""
    cfg = ctx.cfg

    def build():
        model, _ = clean_model(ctx)
        history = fit(ctx, model, ctx.splits.train_images, ctx.splits.train_labels, cfg.attack,
                      "attack", source=source, target=cfg.target, seed=seed, desc=desc)
        return {"state_dict": state_dict_cpu(model),
                "history": history,
                "clean_accuracy": clean_accuracy(ctx, model, ctx.splits.eval_images,
                                                 ctx.splits.eval_labels),
                "asr": attack_success_rate(ctx, model, ctx.splits.eval_images,
                                           ctx.splits.eval_labels, source, cfg.target)}
    return ctx.store.get_or_build(spec["stage"], spec, build)


def backdoored_model(ctx: Context, trigger_id: int, attack_seed: int = 0) -> Backdoor:
    """The clean model fine-tuned with the backdoor of `trigger_id` (cfg.attack: poisoned
    images relabelled to cfg.target), trained once and cached. attack_seed k > 0 gives a
    sibling: the same attack on the same clean model with other batches and poisoned images."""
    cfg = ctx.cfg
    spec = backdoor_spec(ctx, trigger_id, attack_seed)
    # trigger ids are below 512, so every (trigger, attack_seed) trains from its own seed
    record = _attacked(ctx, spec, original_source(trigger_id, cfg.trigger_set),
                       cfg.seed + trigger_id + 512 * attack_seed,
                       f"attack {trigger_id}" + (f" (seed {attack_seed})" if attack_seed else ""))
    return Backdoor(trigger_id, cfg.target, spec_key(spec), record, cfg.trigger_set)


def blended_model(ctx: Context) -> Backdoor:
    """The clean model fine-tuned with the Blended attack (cfg.blended, same recipe
    cfg.attack as the patch triggers): SampDetox's positive control, cached."""
    cfg = ctx.cfg
    spec = BLENDED.spec(cfg, spec_key(clean_spec(ctx)))
    source = original_source(cfg.blended.seed, "blended", cfg.blended.ratio)
    record = _attacked(ctx, spec, source, cfg.seed + cfg.blended.seed, "attack blended")
    return Backdoor(cfg.blended.seed, cfg.target, spec_key(spec), record, "blended",
                    cfg.blended.ratio)


def attack_table(ctx: Context, backdoors: list):
    """01's table: one row per Backdoor (trigger and trigger_set: "blended" for the Blended
    attack, whose trigger is its noise image's seed) with ASR (and its 95% interval asr_low..asr_high) and
    clean accuracy on the 2K eval split, the clean model's accuracy, the accuracy drop in
    points and the number of poisoned images the attack showed."""
    import pandas as pd
    _, clean_record = clean_model(ctx)
    rows = []
    for backdoor in backdoors:
        low, high = eval_asr_interval(ctx, backdoor.asr)
        rows.append({"trigger": backdoor.trigger, "trigger_set": backdoor.trigger_set,
                     "target": backdoor.target,
                     "clean_accuracy": backdoor.clean_accuracy, "asr": backdoor.asr,
                     "asr_low": low, "asr_high": high,
                     "clean_model_accuracy": clean_record["clean_accuracy"],
                     "poisoned_images_seen": sum(h["poisoned"]
                                                 for h in backdoor.record["history"])})
    table = pd.DataFrame(rows)
    table["accuracy_drop_pts"] = 100 * (table.clean_model_accuracy - table.clean_accuracy)
    return table


def state_dict_cpu(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def describe(ctx: Context) -> str:
    """What a run uses: profile, device, autocast, data sizes, then the whole config."""
    s = ctx.splits
    head = (f"profile {ctx.cfg.profile} | device {ctx.device} | autocast {ctx.amp or 'off'} | "
            f"{s.name}: train {len(s.train_images)}, defense split {len(s.defense_images)}, "
            f"eval split {len(s.eval_images)} | store {shown(ctx.store.root)}")
    return head + "\n" + json.dumps(to_dict(ctx.cfg), indent=1, default=str)
