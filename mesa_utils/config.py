"""Every hyperparameter of the pipeline, in one place, as named profiles.

A profile is a complete `Config`. `smoke` only checks that the code runs (CI, seconds per
notebook); `quick` is the real method at reduced scale for a 2-core CPU (README: its run
times); `paper` is the paper's settings (meant for a GPU). `make_config` builds one and
applies validated overrides, e.g. `make_config("quick", triggers=(170,), **{"mesa.steps": 300})`.
"""
import dataclasses
import math
import os
import re
from dataclasses import dataclass

from .methods import CONTRAST_MESA, DEFAULT_METHODS, METHODS
from .triggers import TRIGGER_SETS

PROFILES = ("smoke", "quick", "paper")

# ---------------------------------------------------------------------------------------------
# Rules: what a field allows. Every field names its rule beside its default (setting); a Rule's
# `check(name, value)` raises ValueError "<dotted name> must be <rule>, got <value>", and its
# __str__ states what it allows. Checks that involve several fields follow the profiles.

def _number(x) -> str:
    return f"{x:g}"


class Rule:
    """A field's allowed values: `accepts(value)`, and `check(name, value)` raising ValueError
    "<name> must be <rule>, got <value>" (with `why`, when set, in brackets)."""
    why = ""

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def check(self, name, value):
        if not self.accepts(value):
            reason = f" ({self.why})" if self.why else ""
            raise ValueError(f"{name} must be {self}, got {value!r}{reason}")


INT64_MAX = 2 ** 63 - 1      # torch's seeds and sizes are int64


@dataclass(frozen=True)
class Range(Rule):
    """A number from `low` up to `high` (None: no upper bound); `low_open`/`high_open` exclude
    the bound itself, as in the interval notation of __str__.

    Integer ranges take ints only: bools are ints to Python but never a count or an index.
    Real ranges take ints or floats and always reject NaN and +-inf, bounded or not: a
    non-finite learning rate or weight only fails minutes into training."""
    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    multiple_of: int | None = None
    why: str = ""                   # shown after the error, for limits that are not obvious

    def __str__(self):
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        if self.multiple_of is not None:
            text += f" and divisible by {self.multiple_of}"
        if self.integer:
            return "an integer " + text
        # a bounded interval already says that +-inf is out; an open-ended one must
        return text if self.high is not None else text + " and finite"

    def accepts(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not isinstance(value, (int, float)):
            return False
        # An int is finite, but one beyond int64 fits no tensor, seed or float (10**400 would
        # overflow math.isfinite itself): refused whatever the bound.
        if isinstance(value, int) and abs(value) > INT64_MAX:
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        # Each comparison states what a valid value satisfies, so a NaN (for which every
        # comparison is False) would fail here too, not slip through a negated test.
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = (self.high is None or
                      (value < self.high if self.high_open else value <= self.high))
        return above_low and below_high and \
            (self.multiple_of is None or value % self.multiple_of == 0)



@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of values (strings here)."""
    choices: tuple

    def __str__(self):
        return "one of " + ", ".join(map(repr, self.choices))

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.choices


@dataclass(frozen=True)
class Flag(Rule):
    """True or False (not 0/1, not a string: "False" would be truthy)."""

    def __str__(self):
        return "True or False"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class TriggerId(Rule):
    """A trigger id: an integer >= 0. Which ids exist depends on `trigger_set` (the 51
    canonical black-white ids, or any number of a random-colour trigger), checked across
    fields by _check_trigger_ids."""

    def __str__(self):
        return "a trigger id (an integer in [0, 2^63 - 1])"

    def accepts(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value <= INT64_MAX



@dataclass(frozen=True)
class DeviceName(Rule):
    """"auto", "cpu", "cuda" or "cuda:N": the devices this code runs on. Whether the device
    exists (e.g. CUDA) is checked when it is used (train.get_device), so configs stay
    buildable on any machine."""

    def __str__(self):
        return "'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU's index)"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


@dataclass(frozen=True)
class Each(Rule):
    """A tuple whose every element passes `rule` (checked as name[i]); `length` None means
    any non-empty length (or any length with `allow_empty`); `distinct` forbids repeats."""
    rule: object
    length: int | None = None
    distinct: bool = False
    allow_empty: bool = False

    def __str__(self):
        if self.length is None:
            size = "a tuple" if self.allow_empty else "a non-empty tuple"
        else:
            size = f"a tuple of exactly {self.length} values"
        kind = " of distinct values" if self.distinct else ""
        return f"{size}{kind}, each {self.rule}"

    def _length_fits(self, length):
        if self.length is None:
            return length > 0 or self.allow_empty
        return length == self.length

    def check(self, name, value):
        if not isinstance(value, tuple) or not self._length_fits(len(value)):
            raise ValueError(f"{name} must be {self}, got {value!r}")
        for i, element in enumerate(value):
            self.rule.check(f"{name}[{i}]", element)
        if self.distinct:
            repeated = [x for i, x in enumerate(value) if x in value[:i]]
            if repeated:
                raise ValueError(f"{name} must be {self}, got {value!r}: {repeated[0]!r} "
                                 "repeats")


COUNT = Range(low=1, integer=True)          # how many of something: at least one
INDEX = Range(low=0, integer=True)          # seeds and class ids: 0 upward
POSITIVE = Range(low=0, low_open=True)      # > 0 and finite: learning rates, thresholds
NON_NEGATIVE = Range(low=0)                 # >= 0 and finite: weights, noise levels
OPEN_UNIT = Range(low=0, high=1, low_open=True, high_open=True)     # in (0, 1)
UNIT = Range(low=0, high=1)                 # in [0, 1]: rates, probabilities
BELOW_ONE = Range(low=0, high=1, high_open=True)    # in [0, 1)
RATE = Range(low=0, high=1, low_open=True)  # in (0, 1]: a share of images that gets triggers


def setting(default=dataclasses.MISSING, rule: "Rule" = None, how: bool = False):
    """A config field: its default (none: the field must be given), the Rule its values must
    pass (validate() reads it from the field's metadata) and whether it is a "how" field: one
    that decides where a run computes or what it keeps, not what it computes, and so enters
    no key that names results (HOW_FIELDS)."""
    return dataclasses.field(default=default, metadata={"rule": rule, "how": how})


@dataclass(frozen=True)
class TrainConfig:
    """One SGD fine-tuning/training run; serves clean training, attack and defence alike."""
    epochs: int = setting(rule=COUNT)
    batch_size: int = setting(128, COUNT)
    lr: float = setting(1e-3, POSITIVE)     # peak for "onecycle", constant otherwise
    momentum: float = setting(0.9, BELOW_ONE)   # at 1 past gradients never fade
    nesterov: bool = setting(False, Flag())     # only with momentum > 0 (across fields)
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    # "onecycle": linear warm-up over 20% of the steps, then linear decay
    schedule: str = setting("constant", OneOf(("constant", "onecycle")))
    label_smoothing: float = setting(0.0, BELOW_ONE)    # at 1 the targets carry no label
    augment: bool = setting(False, Flag())      # random crop (pad 4) + horizontal flip
    poison_rate: float = setting(0.0, UNIT)     # per-sample probability r of pasting a trigger


@dataclass(frozen=True)
class GeneratorConfig:
    """How a bank of MESA generators trains (Algorithm 2); authors' values by default."""
    steps: int = setting(620, COUNT)        # 10 epochs of the 8K split at batch 128
    # noise vectors (= triggered images) per generator per step
    batch_size: int = setting(128, Range(
        low=2, integer=True, why="the generator's BatchNorm needs at least 2 samples per batch"))
    lr: float = setting(2e-4, POSITIVE)     # Adam, for G and T alike
    adam_betas: tuple = setting((0.5, 0.999), Each(BELOW_ONE, length=2))   # torch: in [0, 1)
    # uniform [0,1) noise, injected in 4 chunks
    noise_dim: int = setting(64, Range(low=4, integer=True, multiple_of=4,
                                       why="the noise is injected in four equal chunks"))
    hidden: int = setting(512, COUNT)       # 2048 for CIFAR-100 in the paper
    trigger_noise: float = setting(0.1, NON_NEGATIVE)   # std of Gaussian noise on triggers in F
    # MINE's moving-average bias correction for T. The authors used 0.001, which over their 620
    # steps still weights the first step's value by 0.999**620 = 54% at the end: a stale
    # constant, not a running average. 0.01 (MINE's usual rate) leaves 0.2%; see mine_staleness.
    # 0 would never update the average.
    mine_ema_rate: float = setting(0.01, Range(low=0, high=1, low_open=True))
    # triggers sampled to measure a generator's ASR; one gives no usable ASR or MI
    eval_samples: int = setting(2000, Range(low=2, integer=True))


@dataclass(frozen=True)
class MesaConfig(GeneratorConfig):
    """The defence's staircase: one sub-model per beta, all at entropy weight alpha."""
    alpha: float = setting(0.1, NON_NEGATIVE)   # weight of the entropy (MI) term
    # staircase thresholds beta_i on the target softmax; a repeat would train twice
    betas: tuple = setting((0.5, 0.8, 0.9), Each(OPEN_UNIT, distinct=True))


@dataclass(frozen=True)
class DetectionConfig(GeneratorConfig):
    """Target-class detection (section 3.3, step 1): one generator per class at one beta."""
    alpha: float = setting(0.1, NON_NEGATIVE)
    beta: float = setting(0.8, OPEN_UNIT)   # a softmax threshold: 0 and 1 are degenerate
    # a class is flagged when its generator's ASR exceeds this (0 or 1: every or no class)
    threshold: float = setting(0.5, OPEN_UNIT)


@dataclass(frozen=True)
class StudyConfig:
    """The hyper-parameter analysis of Fig. 3 (notebook 03)."""
    trigger: int = setting(170, TriggerId())    # whose backdoored model the generators model
    # swept at beta = `beta`; must include mesa.alpha (across fields)
    alphas: tuple = setting((0.0, 0.1, 10.0), Each(NON_NEGATIVE, distinct=True))
    beta: float = setting(0.8, OPEN_UNIT)
    # sampled triggers per setting for the measures and figures
    samples: int = setting(2000, Range(
        low=2, integer=True, why="spread and nearest-neighbour measures need at least two samples"))
    # every setting trained from this many seeds
    seeds: int = setting(3, Range(low=1, integer=True,
                                  why="each Fig. 3 setting is trained from study.seeds seeds, so "
                                      "study.seeds must be 1 or more"))
    validity_samples: int = setting(256, COUNT)     # triggers per sub-model in the validity matrix
    validity_images: int = setting(64, COUNT)       # held-out images (not the target's) F averages
    # k of the k-NN overlap and entropy measures; below study.samples (across fields)
    neighbours: int = setting(3, COUNT)


@dataclass(frozen=True)
class VisualizationConfig:
    """Fig. 5 and Fig. 1(b) (notebook 05)."""
    # drawn triggers: () = every trigger of the run, else a subset of `triggers` (across fields)
    triggers: tuple = setting((), Each(TriggerId(), distinct=True, allow_empty=True))
    # samples of the beta = max sub-model per t-SNE panel
    samples: int = setting(1000, Range(low=2, integer=True, why="t-SNE needs at least two points"))


@dataclass(frozen=True)
class BaselineConfig:
    """Single reversed trigger: raw 3x3 pixels optimised toward the target (no entropy)."""
    starts: int = setting(10, COUNT)  # random restarts, each retrained and evaluated
    steps: int = setting(55, COUNT)
    lr: float = setting(0.1, POSITIVE)
    momentum: float = setting(0.9, BELOW_ONE)
    batch_size: int = setting(128, COUNT)


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """Neural Cleanse (Wang et al., S&P 2019) mask+pattern reversal, its published settings."""
    steps: int = setting(1000, COUNT)       # per class (all classes in one batch)
    batch_size: int = setting(32, COUNT)
    lr: float = setting(0.1, POSITIVE)      # Adam, betas (0.5, 0.9)
    init_cost: float = setting(1e-3, NON_NEGATIVE)      # initial weight of the mask's L1 norm
    # up by x1.5, down by /1.5**1.5; at 1 the cost would never move
    cost_multiplier: float = setting(1.5, Range(low=1, low_open=True))
    patience: int = setting(5, COUNT)       # checks (every `check_every` steps) before a change
    check_every: int = setting(10, COUNT)
    # reversal counts as successful at this ASR
    asr_threshold: float = setting(0.99, Range(low=0, high=1, low_open=True))
    anomaly_threshold: float = setting(2.0, POSITIVE)   # MAD index above which a class is flagged


@dataclass(frozen=True)
class BlendedConfig:
    """Blended attack (Chen et al., 2017), SampDetox's positive control (notebooks 01, 06):
    x' = (1 - ratio) x + ratio * noise, one fixed uniform noise image over the whole picture,
    trained with the same recipe as the patch attacks (`attack`)."""
    # BackdoorBench's blend ratio for training. 0.1 planted only 69% ASR with quick's one-epoch
    # attack (measured 2026-12-02), short of the 90% every attack here must reach.
    ratio: float = setting(0.2, OPEN_UNIT)  # 0 pastes nothing, 1 replaces the image
    seed: int = setting(0, INDEX)   # draws the noise image (triggers.blend_pattern)


@dataclass(frozen=True)
class SampDetoxConfig:
    """SampDetox (Yang et al., NeurIPS 2024; notebook 06): a DDPM trained here on the clean
    training images, then two-stage purification of every input (the paper's t1, t2)."""
    timesteps: int = setting(1000, Range(low=2, integer=True))  # T of the cosine-schedule DDPM
    # UNet widths, one per resolution (32, 16, 8, 4 pixels), self-attention at the lowest
    channels: tuple = setting((128, 256, 256, 256), Each(COUNT))
    layers_per_block: int = setting(2, COUNT)
    train_steps: int = setting(100000, COUNT)
    batch_size: int = setting(128, COUNT)
    lr: float = setting(2e-4, POSITIVE)     # AdamW
    # the purifying UNet is the average of the training weights
    ema_decay: float = setting(0.9999, BELOW_ONE)
    # training timesteps are drawn uniformly from [0, max_train_timestep): purification never
    # denoises from above t2, so a model for quick may concentrate on those steps (in [t2,
    # timesteps], across fields)
    max_train_timestep: int = setting(1000, COUNT)
    t1: int = setting(20, COUNT)    # stage 1: global noise level (the paper's); t1 <= t2
    t2: int = setting(120, COUNT)   # stage 2: the highest per-pixel level (the paper's); <= T
    # the first images of the 2K eval split purified (0 = all; at most eval_size)
    eval_images: int = setting(0, Range(low=0, integer=True))
    eval_batch_size: int = setting(250, COUNT)  # images purified together


@dataclass(frozen=True)
class ProtocolsConfig:
    """Notebook 07: the paper's central claim under other protocols. Every retraining there
    trains on the defender's split less its first `holdout` images, which choose the quick
    profile's retraining rate r by `ideal_max_asr` (the 2K eval split only reports)."""
    # defender's images held out for choosing r (fewer than its split: protocols.check_holdout)
    holdout: int = setting(1000, COUNT)
    # retraining rates r of the curve
    exposure_rates: tuple = setting((0.01, 0.025, 0.05, 0.1), Each(RATE, distinct=True))
    # The rule for r, fixed before any run: the smallest rate of the curve at which the ideal
    # defence (retraining with the true trigger) leaves a mean held-out ASR of at most this.
    # Below it even the true trigger does not unlearn the backdoor, so no method can be told
    # apart from the others by what it removes.
    ideal_max_asr: float = setting(0.05, UNIT)
    map_trigger: int = setting(170, TriggerId())    # mapped over poison rate x lr x epochs
    map_poison_rates: tuple = setting((0.01, 0.03, 0.1), Each(RATE, distinct=True))
    map_lrs: tuple = setting((1e-3, 3e-3, 1e-2), Each(POSITIVE, distinct=True))
    map_epochs: tuple = setting((1,), Each(COUNT, distinct=True))
    # attack seed of the baseline's sibling model (0 would be the defended model itself)
    sibling_seed: int = setting(1, COUNT)
    # The hard-trigger screen (per-trigger units of kind "screen"): every trigger attacked, its
    # first screen_starts baseline starts retrained at screen_rate, ranked by held-out ASR.
    # 2.5% is the paper's exposure in quick (~700 triggered images over 4 epochs of 7K images;
    # the paper: 1% over 10 epochs of 8K, ~800).
    # () = all 51 black-white triggers
    screen_triggers: tuple = setting((), Each(TriggerId(), distinct=True, allow_empty=True))
    screen_rate: float = setting(0.025, RATE)
    screen_starts: int = setting(1, COUNT)  # at most baseline.starts (across fields)


@dataclass(frozen=True)
class UnknownSizeConfig:
    """Notebook 09: MESA for triggers of unknown size and shape, the paper's future work. Its
    size-free generators output colour and transparency for every pixel of a max_size x
    max_size window, blended in at a random place (triggers.apply_trigger); the defender is
    told max_size only. Every other setting of their training is mesa's (the staircase) and
    detection's (one generator per class)."""
    max_size: int = setting(8, Range(low=1, high=32, integer=True))    # S, within 32x32 images
    # Weight of the mean transparency (in [0, 1]) of the samples that meet the hinge, in each
    # generator's loss (mesa.train_bank). Without it nothing keeps a generator from painting
    # the whole window opaquely: a patch far larger than the trigger, with room for an
    # adversarial patch. Chosen before any backdoored model was seen, on the classifier that
    # fires on one 4x4 pattern only (unknown_size.PatternDetector; 2 seeds, 200 steps, S = 8,
    # 2026-12-06): at costs 0, 0.1, 0.3 and 1 its generators kept 53-54, 29-38, 17-21 and
    # 15-16 opaque pixels, all firing it; 1 is the cost that finds the pattern's 16.
    transparency_cost: float = setting(1.0, NON_NEGATIVE)
    # the trigger sets attacked (triggers.TRIGGER_SETS), and triggers numbered 0.. of each
    trigger_sets: tuple = setting(("black_white_2x2", "black_white_4x4", "black_white_5x5",
                                   "black_white_1x5", "black_white_L4x4", "random_colour"),
                                  Each(OneOf(tuple(TRIGGER_SETS)), distinct=True))
    triggers_per_set: int = setting(3, COUNT)
    # the retraining of 09's comparison (the rest of `defense` kept): epochs and rate r
    epochs: int = setting(10, COUNT)
    poison_rate: float = setting(0.01, RATE)


@dataclass(frozen=True)
class Config:
    profile: str = setting(rule=OneOf(PROFILES))
    dataset: str = setting("cifar10", OneOf(("cifar10", "cifar100")))
    # images of the 50K training set used (0 = all)
    train_subset: int = setting(0, Range(low=0, high=50000, integer=True))
    # images of the 10K test set used (0 = all)
    test_subset: int = setting(0, Range(low=0, high=10000, integer=True))
    # held-out evaluation split (below the test set's size); the rest models triggers, retrains
    eval_size: int = setting(2000, COUNT)
    # ResNet-18 base channels (64 = the paper's). Below 8, torch 2.13's oneDNN channels-last
    # convolutions hang or crash in the backward pass on an AVX2 CPU (5 of 6 tries at width
    # 4 on the 2-core AMD EPYC, 0 of 6 at width 8; 2026-12-06).
    width: int = setting(64, Range(low=8, integer=True, why="oneDNN's channels-last "
                                   "convolutions of fewer channels hang on AVX2 CPUs"))
    target: int = setting(0, INDEX)         # attack target class, below the dataset's classes
    # where trigger ids are from (triggers.TRIGGER_SETS): the 51 black-white 3x3 ids, or
    # Appendix B's "random_colour" or a shaped black-white set (notebook 09), numbered 0..
    trigger_set: str = setting("black_white", OneOf(tuple(TRIGGER_SETS)))
    # trigger ids attacked (black-white: triggers.BW_TRIGGER_IDS); a repeat would duplicate rows
    triggers: tuple = setting((170,), Each(TriggerId(), distinct=True))
    seed: int = setting(0, INDEX)
    device: str = setting("auto", DeviceName(), how=True)   # "auto", "cpu", "cuda", "cuda:1", ...
    # bf16 autocast: "auto" (where the hardware has bf16), "on", "off"
    amp: str = setting("auto", OneOf(("auto", "on", "off")))
    eval_batch_size: int = setting(500, COUNT)
    clean: TrainConfig = TrainConfig(epochs=30, batch_size=256, lr=0.2, nesterov=True,
                                     weight_decay=5e-4, schedule="onecycle",
                                     label_smoothing=0.1, augment=True)
    attack: TrainConfig = TrainConfig(epochs=10, lr=1e-3, poison_rate=0.01)
    mesa: MesaConfig = MesaConfig()
    detection: DetectionConfig = DetectionConfig()
    study: StudyConfig = StudyConfig()
    defense: TrainConfig = TrainConfig(epochs=10, lr=1e-3, poison_rate=0.01)
    baseline: BaselineConfig = BaselineConfig()
    neural_cleanse: NeuralCleanseConfig = NeuralCleanseConfig()
    visualization: VisualizationConfig = VisualizationConfig()
    blended: BlendedConfig = BlendedConfig()
    sampdetox: SampDetoxConfig = SampDetoxConfig()
    protocols: ProtocolsConfig = ProtocolsConfig()
    unknown_size: UnknownSizeConfig = UnknownSizeConfig()
    # every non-baseline defence is retrained from this many seeds (seed, seed + 1, ...); the
    # baseline's starts are its seeds. The reversed triggers and MESA's generators stay those
    # of `seed`: the seeds repeat the retraining (batches, pasted positions, sampled triggers).
    defense_seeds: int = setting(1, COUNT)
    # The defences 04 compares (names of methods.METHODS); by default every one but 09's
    # size-free MESA (methods.DEFAULT_METHODS). CONTRAST_MESA and the baseline are needed: 04
    # retrains the one by hand and sets it against the other.
    defense_methods: tuple = setting(DEFAULT_METHODS, Each(OneOf(tuple(METHODS)), distinct=True))
    # keep retrained weights (51 x 17 in paper); no table reads them
    save_retrained: bool = setting(True, Flag(), how=True)
    # A trigger's retrainings are trained up to this many at a time as one banked network
    # (models.ResNetBank, one grouped convolution per layer), which keeps a GPU busy where one
    # batch-128 model leaves it idle; 1 trains them one after another. Members end as the lone
    # runs would in exact arithmetic, but float32 rounding grows over a retraining (on smoke up
    # to 1.7 ASR points): the bank size is part of every key that names retrained results.
    retrain_bank: int = setting(1, COUNT)


def _smoke() -> Config:
    tiny = dict(batch_size=64)
    return Config(
        profile="smoke", train_subset=1024, test_subset=768, eval_size=256, width=8,
        triggers=(170, 0), visualization=VisualizationConfig(triggers=(170,), samples=64),
        clean=TrainConfig(epochs=1, lr=0.05, schedule="onecycle", augment=True, **tiny),
        # half the images poisoned: a one-epoch attack on 1,024 images plants (ASR >= 0.9) on
        # 7 of 8 (trigger, model) pairs, which notebook 08 needs (at 0.2: 0 of 8)
        attack=TrainConfig(epochs=1, lr=1e-2, poison_rate=0.5, **tiny),
        mesa=MesaConfig(steps=6, batch_size=16, hidden=32, eval_samples=64, mine_ema_rate=0.5),
        detection=DetectionConfig(steps=6, batch_size=16, hidden=32, eval_samples=64,
                                  mine_ema_rate=0.5),
        study=StudyConfig(samples=64, validity_samples=16, validity_images=8),
        defense=TrainConfig(epochs=1, lr=1e-2, poison_rate=0.1, **tiny),
        baseline=BaselineConfig(starts=2, steps=5, batch_size=16),
        neural_cleanse=NeuralCleanseConfig(steps=10, batch_size=16, check_every=5, patience=1),
        sampdetox=SampDetoxConfig(channels=(8, 16), layers_per_block=1, train_steps=5,
                                  batch_size=16, ema_decay=0.5, max_train_timestep=200,
                                  eval_images=32, eval_batch_size=32),
        protocols=ProtocolsConfig(holdout=128, exposure_rates=(0.05, 0.1),
                                  map_poison_rates=(0.2,), map_lrs=(1e-2, 5e-2),
                                  # four: the fewest whose rankings 08 can compare
                                  screen_triggers=(170, 0, 15, 186)),
        # one trigger, the shape that is pasted through its mask
        unknown_size=UnknownSizeConfig(max_size=5, trigger_sets=("black_white_L4x4",),
                                       triggers_per_set=1, epochs=1, poison_rate=0.1),
    )


def _quick() -> Config:
    # Calibrated on a 2-core CPU (README, "Profiles"): a ResNet-18 of width 16; the attack shows
    # about the paper's number of poisoned images (~5,000) in one epoch, at 10x the paper's poison
    # rate and 10x its learning rate: both are needed (07's attack map: at 10% poison, lr 1e-3
    # plants 8%, 1e-2 99%; at 1-3% poison no lr of the map plants more than 4%).
    # Triggers: the paper's three figures' (170, 186, 15). 08's screen of all 51 found no
    # trigger that stays hard for a single reversed trigger (its ranking follows the noise of
    # one run), so none is added for hardness; five would not fit the default run's hour.
    # The retraining rate r is 07's rule (the smallest r at which the ideal defence leaves a
    # held-out mean ASR <= 5%) on these three: it chose 5% there (1,600 triggered images;
    # paper ~800); at 2.5% even the ideal defence left 9.2% ASR on this stronger,
    # shorter-trained backdoor.
    # 04 compares the methods of the paper's contrast (MESA's mixture, the baseline, the ideal
    # defence) and the two controls, 3 retraining seeds each; the other variants run when
    # named: -y 'overrides: {"defense_methods": [...]}' (README, "The notebooks").
    return Config(
        profile="quick", width=16, triggers=(170, 186, 15),
        clean=TrainConfig(epochs=8, batch_size=256, lr=0.2, nesterov=True, weight_decay=5e-4,
                          schedule="onecycle", label_smoothing=0.1, augment=True),
        attack=TrainConfig(epochs=1, lr=1e-2, poison_rate=0.1),
        mesa=MesaConfig(steps=300, batch_size=64, lr=5e-4, hidden=256, eval_samples=1000,
                        mine_ema_rate=0.02),
        detection=DetectionConfig(steps=200, batch_size=32, lr=5e-4, hidden=256,
                                  eval_samples=500, mine_ema_rate=0.02),
        study=StudyConfig(samples=1000),
        defense=TrainConfig(epochs=4, lr=1e-3, poison_rate=0.05), defense_seeds=3,
        defense_methods=(CONTRAST_MESA, "baseline", "ideal", "finetune", "random_patch"),
        baseline=BaselineConfig(starts=3),
        neural_cleanse=NeuralCleanseConfig(steps=300),
        # A 1.1M-parameter UNet sized to train in ~15 min on the 2-core CPU (0.46 s a step;
        # 17 min measured in the quick run), on timesteps below 200 only: purification starts
        # at t2 = 120 at most. 300 eval images: purifying costs 140 UNet passes each (0.31 s an
        # image here).
        sampdetox=SampDetoxConfig(channels=(32, 64, 64), layers_per_block=1, train_steps=1800,
                                  batch_size=64, lr=5e-4, ema_decay=0.999,
                                  max_train_timestep=200, eval_images=300,
                                  eval_batch_size=300),
        # 09 within 90 min on the 2-core CPU (about 70 from an empty store, 2026-12-06): one
        # trigger of each of four shapes, and its 21 retrainings per trigger in one epoch at
        # r = 20%, which shows as many triggered images (1,600) as 04's four epochs at 5% in a
        # quarter of the time.
        unknown_size=UnknownSizeConfig(trigger_sets=("black_white_2x2", "black_white_5x5",
                                                     "black_white_L4x4", "random_colour"),
                                       triggers_per_set=1, epochs=1, poison_rate=0.2),
    )


def _paper() -> Config:
    from .triggers import BW_TRIGGER_IDS
    return Config(profile="paper", triggers=BW_TRIGGER_IDS,
                  visualization=VisualizationConfig(triggers=(170, 186, 15)),
                  save_retrained=False)


def make_config(profile: str | None = None, /, **overrides) -> Config:
    """The named profile (default: $MESA_PROFILE, else "quick") with `overrides` applied.

    Overrides name a field (`triggers=(170,)`) or a field of a section (`**{"mesa.steps": 50}`).
    Unknown names, wrong types and invalid values raise ValueError.
    """
    if "profile" in overrides:
        raise ValueError("profile is not an override: choose it with make_config's profile "
                         "(the notebooks' `profile` parameter, run_all.sh's --profile)")
    profile = profile or os.environ.get("MESA_PROFILE") or "quick"
    builders = {"smoke": _smoke, "quick": _quick, "paper": _paper}
    if profile not in builders:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} "
                         "(argument `profile` or environment variable MESA_PROFILE)")
    cfg = builders[profile]()
    sections = {}
    for name, value in overrides.items():
        if value is None:
            continue
        section, _, sub = name.partition(".")
        if sub:
            sections.setdefault(section, {})[sub] = value
        else:
            cfg = _replace(cfg, name, value)
    for section, values in sections.items():
        inner = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"unknown config section {section!r} in override {section}.*")
        for sub, value in values.items():
            inner = _replace(inner, sub, value, prefix=section + ".")
        cfg = dataclasses.replace(cfg, **{section: inner})
    validate(cfg)
    return cfg


def notebook_config(profile: str | None, overrides: dict, **parameters) -> Config:
    """make_config for a notebook's parameters cell: its named parameters (`triggers`,
    `target`, ...; None keeps the profile's value) and `overrides` (any other field). A field
    given both ways raises ValueError instead of silently taking one of them."""
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a mapping of config fields to values, e.g. -y "
                         f"'overrides: {{\"mesa.steps\": 50}}', got {type(overrides).__name__} "
                         f"{overrides!r}")
    both = sorted(name for name, value in parameters.items()
                  if value is not None and name in overrides)
    if both:
        raise ValueError(f"{', '.join(both)} given both as a notebook parameter and inside "
                         f"overrides; give each once (e.g. -y 'triggers: [170]' or "
                         f"-y 'overrides: {{\"triggers\": [170]}}')")
    return make_config(profile, **{**parameters, **overrides})


def _replace(obj, name, value, prefix=""):
    """`obj` with field `name` set to `value`, which must have the field's type (lists are
    taken for tuples, ints for floats)."""
    fields = [f.name for f in dataclasses.fields(obj)]
    if name not in fields:
        raise ValueError(f"unknown config field '{prefix}{name}'; known: {', '.join(fields)}")
    current = getattr(obj, name)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, float) and type(value) is int:
        if abs(value) > INT64_MAX:          # 10**400 has no float: OverflowError otherwise
            raise ValueError(f"{prefix}{name} must be a finite number, got {value!r}")
        value = float(value)
    if type(value) is not type(current):
        raise ValueError(f"config field {prefix}{name} must be {type(current).__name__}, "
                         f"got {value!r}")
    return dataclasses.replace(obj, **{name: value})


# ---------------------------------------------------------------------------------------------
# Validation: every field against the rule beside it, then the checks across fields.

SECTIONS = (Config, TrainConfig, GeneratorConfig, MesaConfig, DetectionConfig, StudyConfig,
            VisualizationConfig, BaselineConfig, NeuralCleanseConfig, BlendedConfig,
            SampDetoxConfig, ProtocolsConfig, UnknownSizeConfig)
# {dataclass: {field: its Rule}}, read from the fields (a section field, itself a dataclass,
# has none: its own fields are checked).
RULES = {section: {f.name: f.metadata["rule"] for f in dataclasses.fields(section)
                   if f.metadata.get("rule") is not None} for section in SECTIONS}


def validate(cfg: Config) -> None:
    """Raise ValueError naming the first invalid field (dotted, e.g. `mesa.steps`), its value
    and what it allows: every field against its rule in RULES, then the checks across fields."""
    _check_fields(cfg, prefix="")
    _check_across_fields(cfg)


def _check_fields(obj, prefix):
    rules = RULES[type(obj)]
    for field in dataclasses.fields(obj):
        name, value = prefix + field.name, getattr(obj, field.name)
        if dataclasses.is_dataclass(field.type):    # a section: its own fields
            if not isinstance(value, field.type):
                raise ValueError(f"{name} must be a {field.type.__name__}, got {value!r}")
            _check_fields(value, prefix=name + ".")
        elif field.name in rules:
            rules[field.name].check(name, value)
        else:   # a programming error, caught by tests/test_config.py before any user sees it
            raise LookupError(f"config field {name} has no validation rule; declare it with "
                              f"setting(default, rule) in {type(obj).__name__} "
                              "(mesa_utils/config.py)")


# The share of MINE's moving average still resting on the first step's value at the end of
# training, (1 - rate) ** steps, may be at most this: above it the bias correction is a stale
# constant (quick's old 0.001 over 300 steps kept 74%).
MINE_STALENESS_LIMIT = 0.05


def mine_staleness(rate: float, steps: int) -> float:
    """Weight (0-1] that MINE's moving average puts on its first value after `steps` updates
    at `rate`: (1 - rate) ** steps."""
    return (1 - rate) ** steps


def _check_trigger_ids(cfg) -> None:
    """With trigger_set "black_white", every trigger id must be one of the 51 canonical ids."""
    if cfg.trigger_set != "black_white":
        return
    from .triggers import check_trigger_ids
    named = [(f"triggers[{i}]", t) for i, t in enumerate(cfg.triggers)]
    named += [("study.trigger", cfg.study.trigger), ("protocols.map_trigger",
                                                     cfg.protocols.map_trigger)]
    named += [(f"visualization.triggers[{i}]", t) for i, t in enumerate(cfg.visualization.triggers)]
    named += [(f"protocols.screen_triggers[{i}]", t)
              for i, t in enumerate(cfg.protocols.screen_triggers)]
    for name, trigger_id in named:
        try:
            check_trigger_ids((trigger_id,))
        except ValueError as error:     # its text says why: out of 0..511, or which id to use
            raise ValueError(f"{name} must be a canonical trigger id (one of the 51 in "
                             f"triggers.BW_TRIGGER_IDS) with trigger_set 'black_white', got "
                             f"{trigger_id!r}: {error}") from None


def _check_across_fields(cfg: Config) -> None:
    """Limits that depend on another field or on which section a dataclass fills."""
    _check_trigger_ids(cfg)
    num_classes = 10 if cfg.dataset == "cifar10" else 100
    if cfg.target >= num_classes:
        raise ValueError(f"target must be an integer in [0, {num_classes - 1}], got "
                         f"{cfg.target}: target class {cfg.target} does not exist in "
                         f"{cfg.dataset}")

    test_size = cfg.test_subset or 10000
    if cfg.eval_size >= test_size:      # the rest of the test set models triggers/retrains
        raise ValueError(f"eval_size must be an integer in [1, {test_size - 1}] (below the "
                         f"test set size {test_size}), got {cfg.eval_size}")

    for section in ("clean", "attack", "defense"):
        train = getattr(cfg, section)
        if train.nesterov and not train.momentum > 0:
            raise ValueError(f"{section}.nesterov=True needs {section}.momentum > 0 (torch's "
                             f"SGD refuses Nesterov without momentum), got {section}.momentum="
                             f"{train.momentum!r}")

    # Clean training never pastes triggers: a non-zero rate would silently do nothing.
    if cfg.clean.poison_rate != 0:
        raise ValueError(f"clean.poison_rate must be 0 (clean training never poisons), got "
                         f"{cfg.clean.poison_rate!r}")
    # An attack without poison plants no backdoor. (defense.poison_rate 0 stays allowed:
    # retraining without triggers is a control.)
    if not cfg.attack.poison_rate > 0:
        raise ValueError(f"attack.poison_rate must be in (0, 1] (an attack without poison "
                         f"plants nothing), got {cfg.attack.poison_rate!r}")

    for section in ("mesa", "detection"):
        gen = getattr(cfg, section)
        stale = mine_staleness(gen.mine_ema_rate, gen.steps)
        if stale > MINE_STALENESS_LIMIT:
            needed = 1 - MINE_STALENESS_LIMIT ** (1 / gen.steps)
            raise ValueError(
                f"{section}.mine_ema_rate must be >= {needed:.3g} for {section}.steps = "
                f"{gen.steps}, got {gen.mine_ema_rate:g}: MINE's moving average would still "
                f"weight its first value by {100 * stale:.0f}% at the end of training (at most "
                f"{100 * MINE_STALENESS_LIMIT:g}% allowed), a stale constant instead of a "
                f"running correction. Raise the rate or the steps.")

    sd = cfg.sampdetox
    if not sd.t1 <= sd.t2 <= sd.timesteps:
        raise ValueError(f"sampdetox.t1 <= sampdetox.t2 <= sampdetox.timesteps is needed (stage "
                         f"1's global noise is the lighter one, and no level exceeds the "
                         f"schedule), got t1={sd.t1}, t2={sd.t2}, timesteps={sd.timesteps}")
    if not sd.t2 <= sd.max_train_timestep <= sd.timesteps:
        raise ValueError(f"sampdetox.max_train_timestep must be an integer in [{sd.t2}, "
                         f"{sd.timesteps}] (from t2, the highest level purification denoises "
                         f"from, up to timesteps), got {sd.max_train_timestep}")
    if len(sd.channels) < 2 or 32 % 2 ** (len(sd.channels) - 1):
        raise ValueError(f"sampdetox.channels must hold 2 to 6 widths (one per resolution, "
                         f"halving from 32x32 pixels), got {sd.channels!r}")
    if sd.eval_images > cfg.eval_size:
        raise ValueError(f"sampdetox.eval_images must be an integer in [0, {cfg.eval_size}] "
                         f"(0 = the whole eval split of eval_size images), got {sd.eval_images}")

    needed = [m for m in (CONTRAST_MESA, "baseline") if m not in cfg.defense_methods]
    if needed:
        raise ValueError(f"defense_methods must include {CONTRAST_MESA!r} and 'baseline' (04 "
                         f"retrains the first by hand and sets it against the second), got "
                         f"{cfg.defense_methods!r}")

    if cfg.protocols.screen_starts > cfg.baseline.starts:
        raise ValueError(f"protocols.screen_starts must be an integer in [1, "
                         f"{cfg.baseline.starts}] (at most baseline.starts, the starts reversed), "
                         f"got {cfg.protocols.screen_starts}")

    if cfg.study.neighbours >= cfg.study.samples:
        raise ValueError(f"study.neighbours must be an integer in [1, {cfg.study.samples - 1}] "
                         f"(below study.samples), got {cfg.study.neighbours}")

    # Fig. 3 compares every alpha and every seed with the reference setting (mesa.alpha at
    # study.beta): it must be one of the swept alphas, or notebook 03 fails after training.
    if cfg.mesa.alpha not in cfg.study.alphas:
        raise ValueError(f"study.alphas must include mesa.alpha ({cfg.mesa.alpha:g}), the "
                         f"reference of the Fig. 3 comparisons, got {cfg.study.alphas!r}")

    # Notebook 05 draws backdoors of this run; another trigger would train a model for it.
    outside = [t for t in cfg.visualization.triggers if t not in cfg.triggers]
    if outside:
        raise ValueError(f"visualization.triggers must be among triggers {cfg.triggers!r} (or "
                         f"() for all of them), got {cfg.visualization.triggers!r}: "
                         f"{outside[0]} is not attacked in this run")


def to_dict(obj) -> dict:
    """Plain nested dict of a config (for JSON, cache keys and printing)."""
    return dataclasses.asdict(obj)


def leaf_paths(section=None, prefix="") -> list:
    """Every field of Config (or of dataclass `section`) that holds a value, as a dotted path
    ("seed", "mesa.steps"), in declaration order: the fields a key or an override can name."""
    paths = []
    for field in dataclasses.fields(section or Config):
        if dataclasses.is_dataclass(field.type):
            paths += leaf_paths(field.type, prefix + field.name + ".")
        else:
            paths.append(prefix + field.name)
    return paths


def field_metadata(path: str) -> dict:
    """The metadata of the field at dotted `path` (its rule, whether it is "how")."""
    section, *parents, name = [Config, *path.split(".")]
    for parent in parents:
        section = {f.name: f.type for f in dataclasses.fields(section)}[parent]
    return {f.name: f.metadata for f in dataclasses.fields(section)}[name]


def lookup(cfg, path: str):
    """The value at dotted `path` of cfg ("mesa.steps"), a section (a dataclass) included."""
    value = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return value


# Fields that decide where a run computes or what it keeps, not what it computes (declared
# with setting(..., how=True)): no key that names results counts them, nor any list of
# overridden fields.
HOW_FIELDS = tuple(path for path in leaf_paths() if field_metadata(path)["how"])


def results_dict(cfg: "Config") -> dict:
    """{dotted field: value} of every field of cfg but HOW_FIELDS: for hashes that name results
    (output folders)."""
    return {path: lookup(cfg, path) for path in leaf_paths() if path not in HOW_FIELDS}
