"""MESA: max-entropy staircase approximator (Algorithms 1-2 of the paper).

A bank of K generators G_i, each with its own (beta_i, alpha_i, target class c_i), is trained
in one loop: every step draws K x B noise vectors, pastes the K x B triggers onto K x B images
of the defender's split and runs ONE pass of the frozen classifier over them. Generator loss per
member (paper, eq. 4):

    L_i = mean_z max(0, beta_i - F_i(G_i(z) + noise)) - alpha_i * I_T(G_i(z); z')

with F_i the classifier's softmax of class c_i and I_T the Donsker-Varadhan lower bound of a
MINE statistics network T_i (trained in alternation, with MINE's moving-average correction).
Every member draws its noise, images and positions from its own seeded stream, so a bank
reproduces K generators trained one by one (tests/test_mesa.py). A trained bank is a `Bank`:
its sub-models are addressed by their `Member` (beta, alpha, target, seed), not by position.

A size-free bank (notebook 09, the paper's future work) generates colour AND transparency
for every pixel of an S x S window, (K, B, 4, S, S), blended in where it is pasted
(triggers.apply_trigger), and adds to L_i transparency_cost times the mean transparency of
its samples that meet the hinge: the defender is told S, not the trigger's size or shape.

Stages built on it: target detection (02, 09), the hyper-parameter study of Fig. 3 (03) and
the defence's staircase (04, 05, 09). The measures and tables computed on their samples are in
analysis.py.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .config import GeneratorConfig
from .data import to_pixels
from .models import GeneratorBank, StatisticsBank, frozen
from .stages import BANK_STAGES
from .store import NonFiniteError, spec_key
from .train import (CHECK_EVERY, Backdoor, Context, FiniteGuard, attack_stats, autocast,
                    progress)
from .triggers import apply_trigger


@dataclass(frozen=True)
class Member:
    """One sub-model: threshold beta on the target softmax, entropy weight alpha, target class,
    and the seed of its initialisation and training randomness."""
    beta: float
    alpha: float
    target: int
    seed: int = 0

    def label(self) -> str:
        return f"a={self.alpha:g} b={self.beta:g} seed {self.seed}"


# ---------------------------------------------------------------------------------------------
# Mutual information (MINE)

def dv_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound E_joint[T] - log E_marginal[e^T], per member: (K, B) -> (K,)."""
    return t_joint.mean(1) - (torch.logsumexp(t_marginal, 1) - math.log(t_marginal.shape[1]))


def mine_step(stats: StatisticsBank, optimizer, z, x, z_marginal, log_ema, rate):
    """One update of T towards a tighter bound, with MINE's bias-corrected gradient.

    z, z_marginal: (K, B, nz) noise; x: (K, B, ...) samples (no gradient to their producer).
    log_ema: (K,) running log E_marginal[e^T] or None on the first step. Returns the new
    log_ema and the bound (K,) before the update.
    """
    t_joint, t_marginal = stats(z, x), stats(z_marginal, x)
    log_mean_exp = torch.logsumexp(t_marginal, 1) - math.log(t_marginal.shape[1])
    if log_ema is None:
        log_ema = log_mean_exp.detach()
    else:
        log_ema = torch.logaddexp(log_ema + math.log1p(-rate),
                                  log_mean_exp.detach() + math.log(rate))
    # d/dtheta of E[e^T] / ema replaces the biased d/dtheta log E[e^T] (MINE, section 3.2).
    loss = -(t_joint.mean(1) - torch.exp(log_mean_exp - log_ema)).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return log_ema, (t_joint.mean(1) - log_mean_exp).detach()


# ---------------------------------------------------------------------------------------------
# Bank training

def _draw(streams, b, noise_dim, pools, high, trigger_shape, device):
    """Each member's randomness for one step from its own stream, stacked to (K, B, ...):
    noise, marginal noise, image indices (from the member's pool: the images outside its
    target class), trigger corners, trigger jitter."""
    draws = []
    for g, pool in zip(streams, pools):
        draws.append((torch.rand(b, noise_dim, generator=g, device=device),
                      torch.rand(b, noise_dim, generator=g, device=device),
                      pool[torch.randint(len(pool), (b,), generator=g, device=device)],
                      (torch.rand(b, 2, generator=g, device=device) * high).long(),
                      torch.randn(b, *trigger_shape, generator=g, device=device)))
    return [torch.stack(column) for column in zip(*draws)]


def non_target_pool(labels: torch.Tensor, target: int) -> torch.Tensor:
    """Indices of the images whose label is not `target`: where F is measured. An image of
    the target class is sent to the target with no trigger at all, so it says nothing about
    a trigger (and would let the hinge of a wrong class's generator look satisfied)."""
    pool = (labels != target).nonzero().squeeze(1)
    if not len(pool):
        raise ValueError(f"every image is of the target class {target}: no image to paste a "
                         "trigger on")
    return pool


CPU_CLASSIFIER_CHUNK = 128  # images per classifier forward on a CPU (see train_bank)


def _divergence_advice(setting, mcfg, members) -> str:
    return (f"Lower {setting}.lr (now {mcfg.lr:g}) or the entropy weight alpha (largest in "
            f"this bank: {max(m.alpha for m in members):g}).")


def train_bank(ctx: Context, classifier, members, mcfg: GeneratorConfig, images, labels,
               trigger_shape=(3, 3, 3), desc="MESA", setting="mesa", transparency_cost=0.0):
    """Train one generator (and one T) per Member on uint8 `images` (N, H, W, C), each from
    its member's seed.

    trigger_shape: (C, h, w) triggers, or (C + 1, S, S) colour and transparency (size-free;
    the Gaussian noise of the F term jitters the colour only, and each member's loss adds
    transparency_cost times the mean transparency of its samples that meet the hinge, those
    with F >= beta). The classifier is frozen in place.
    Returns (generators, statistics, log) with log a dict of (steps, K) tensors: hinge, mi,
    softmax (mean target softmax), asr (share of samples classified as the target), and for
    a size-free bank opacity (mean transparency in [0, 1]). F is measured on images outside
    each member's target class (non_target_pool). `setting` names mcfg's config section
    ("mesa", "detection") in the NonFiniteError raised when training diverges.
    """
    device, k, b = ctx.device, len(members), mcfg.batch_size
    seeds = [m.seed for m in members]
    classifier = frozen(classifier)
    channels = images.shape[3]
    size_free = trigger_shape[0] == channels + 1
    generators = GeneratorBank(k, mcfg.noise_dim, mcfg.hidden, trigger_shape, seeds).to(device)
    stats = StatisticsBank(k, mcfg.noise_dim, mcfg.hidden, trigger_shape, seeds).to(device)
    opt_g = torch.optim.Adam(generators.parameters(), lr=mcfg.lr, betas=mcfg.adam_betas)
    opt_t = torch.optim.Adam(stats.parameters(), lr=mcfg.lr, betas=mcfg.adam_betas)
    betas = torch.tensor([m.beta for m in members], device=device)[:, None]      # (K, 1)
    alphas = torch.tensor([m.alpha for m in members], device=device)
    targets = torch.tensor([m.target for m in members], device=device)          # (K,)
    streams = [torch.Generator(device).manual_seed(s) for s in seeds]
    pools = [non_target_pool(labels, m.target) for m in members]
    height, width = images.shape[1:3]
    high = torch.tensor([height - trigger_shape[1] + 1, width - trigger_shape[2] + 1],
                        device=device)
    # One K x B forward suits a GPU; a CPU is fastest per image near 128 images (cache), so
    # there the batch goes through in pieces: same result, graph and gradients.
    chunk = k * b if device.type == "cuda" else CPU_CLASSIFIER_CHUNK
    names = ("hinge", "mi", "softmax", "asr") + (("opacity",) if size_free else ())
    log = {name: [] for name in names}                              # (K,) per step, on device
    # the noise of the F term jitters colour, never transparency
    jitter_channels = torch.arange(trigger_shape[0], device=device)[:, None, None] < channels
    log_ema = None
    guard = FiniteGuard(desc, mcfg.steps, _divergence_advice(setting, mcfg, members), device)
    generators.train()
    bar = progress(range(mcfg.steps), desc)
    for step in bar:
        z, z_marginal, index, corner, jitter = _draw(
            streams, b, mcfg.noise_dim, pools, high, trigger_shape, device)
        x = generators(z)                                                   # (K, B, C, h, w)
        log_ema, t_bound = mine_step(stats, opt_t, z, x.detach(), z_marginal, log_ema,
                                     mcfg.mine_ema_rate)
        stats.requires_grad_(False)  # the G step differentiates through T, not T itself
        mi = dv_bound(stats(z, x), stats(z_marginal, x))                    # (K,)
        stats.requires_grad_(True)
        # F term: noisy triggers (authors' std 0.1, unclamped) on K x B images outside each
        # member's target class, one (chunked) pass.
        pasted = apply_trigger(to_pixels(images[index.flatten()]),
                               (x + mcfg.trigger_noise * jitter * jitter_channels).flatten(0, 1),
                               corner.flatten(0, 1), check=False)      # drawn valid in _draw
        with autocast(device, ctx.amp):
            logits = torch.cat([classifier(part) for part in pasted.split(chunk)])
        probs = logits.float().softmax(1).view(k, b, -1)
        softmax = probs.gather(2, targets.view(k, 1, 1).expand(k, b, 1)).squeeze(2)  # (K, B)
        hinge = F.relu(betas - softmax).mean(1)
        loss = (hinge - alphas * mi).sum()
        if size_free:
            # Transparency costs only on samples that already meet the hinge: they shed the
            # opacity they do not need, and a generator is never pushed to transparency before
            # it has found what fires (at the start F is near 0 and so is its gradient).
            opacity = x[:, :, channels:].mean((2, 3, 4))                     # (K, B)
            met = (softmax >= betas).detach()
            loss = loss + transparency_cost * (opacity * met).mean(1).sum()
            opacity = opacity.mean(1)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        with torch.no_grad():
            asr = (probs.argmax(2) == targets[:, None]).float().mean(1)
        guard.watch(step, loss, t_bound, log_ema)
        for name, value in (("hinge", hinge), ("mi", mi), ("softmax", softmax.mean(1)),
                            ("asr", asr)) + ((("opacity", opacity),) if size_free else ()):
            log[name].append(value.detach())
        if (step + 1) % CHECK_EVERY == 0:
            bar.set_postfix(softmax=f"{float(log['softmax'][-1].mean()):.2f}",
                            mi=f"{float(log['mi'][-1].mean()):.2f}")
    guard.finish([*generators.state_dict().items(), *stats.state_dict().items()])
    generators.eval()
    return generators, stats, {name: torch.stack(v).cpu() for name, v in log.items()}


# ---------------------------------------------------------------------------------------------
# Sampling

class GeneratorSampler:
    """Triggers (n, C, h, w) in (0, 1) from a GeneratorBank: one generator, or a mixture.

    positions: the generators mixed (default all; `Bank.sampler` takes Members instead).
    weights: mixture weights gamma over them (default uniform 1/N, the paper's practical
    choice; `entropy_weights` gives Algorithm 1's, `Bank.entropy_sampler` uses them). Calling
    the sampler on pixels pastes one fresh trigger per image: a trigger source for poisoning.
    """

    def __init__(self, generators: GeneratorBank, positions=None, weights=None):
        self.generators = generators.eval()
        self.positions = list(range(generators.k)) if positions is None else list(positions)
        if not self.positions:
            raise ValueError("a sampler needs at least one generator")
        weights = torch.ones(len(self.positions)) if weights is None else torch.as_tensor(
            weights, dtype=torch.float32)
        if weights.shape != (len(self.positions),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(self.positions)} non-negative numbers with "
                             f"a positive sum, got {weights.tolist()}")
        # on the generators' device once, so that sampling copies nothing from the host
        device = next(self.generators.parameters()).device
        self.weights = (weights / weights.sum()).to(device)
        self.index = torch.tensor(self.positions, device=device)

    @torch.no_grad()
    def sample(self, n, generator=None, return_members=False):
        device = self.index.device
        pick = torch.multinomial(self.weights, n, replacement=True,
                                 generator=generator)                        # (n,) positions
        member = self.index[pick]
        z = self.generators.noise(n, generator, device)                      # (K, n, nz)
        triggers = self.generators(z)[member, torch.arange(n, device=device)]
        return (triggers, member) if return_members else triggers

    def __call__(self, images, generator=None):
        return apply_trigger(images, self.sample(len(images), generator), generator=generator)


@torch.no_grad()
def trigger_softmax(ctx: Context, classifier, triggers, target: int, images, labels,
                    n_images: int = 64, seed: int = 0) -> torch.Tensor:
    """The paper's F for each of `triggers` (n, C, h, w) in [0, 1]: the classifier's softmax
    of `target` averaged over the same `n_images` images outside the target class (drawn once
    from uint8 `images` (N, H, W, C) with `labels`), each trigger-image pair at its own random
    position. Returns (n,) in [0, 1] on the CPU; a NaN/inf softmax raises NonFiniteError."""
    classifier = frozen(classifier)
    generator = torch.Generator(ctx.device).manual_seed(seed)
    pool = non_target_pool(labels, target)
    pick = pool[torch.randperm(len(pool), generator=generator, device=pool.device)[:n_images]]
    pixels = to_pixels(images[pick])                                       # (m, C, H, W)
    m = len(pick)
    per_pass = max(1, ctx.cfg.eval_batch_size // m)
    means = []
    for part in triggers.to(ctx.device).split(per_pass):
        pasted = apply_trigger(pixels.repeat(len(part), 1, 1, 1),
                               part.repeat_interleave(m, 0), generator=generator)
        with autocast(ctx.device, ctx.amp):
            probs = classifier(pasted).float().softmax(1)[:, target]
        means.append(probs.view(len(part), m).mean(1))
    values = torch.cat(means).cpu()
    if not torch.isfinite(values).all():
        raise NonFiniteError("the classifier's softmax is NaN or inf on triggered images: "
                             "it is broken and cannot score triggers")
    return values


def step_widths(betas) -> torch.Tensor:
    """The staircase's step widths beta_i - beta_(i-1) (beta_0 = 0) of thresholds given in
    any order, returned in that order: (N,). With beta_i = i/N every width is 1/N."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if len(betas) == 0 or len(set(betas.tolist())) != len(betas) or not (
            (betas > 0) & (betas < 1)).all():
        raise ValueError(f"betas must be distinct thresholds in (0, 1), got {betas.tolist()}")
    ordered, order = betas.sort()
    widths = torch.diff(ordered, prepend=ordered.new_zeros(1))
    return torch.empty_like(widths).scatter_(0, order, widths)


def entropy_weights(mi: torch.Tensor, empty: torch.Tensor, betas) -> torch.Tensor:
    """Algorithm 1's mixture weights gamma (N,) for sub-models with entropy estimates `mi`
    (nats), `empty` flags and thresholds `betas`:

        gamma_i  proportional to  exp(h(G_i)) * (beta_i - beta_(i-1)) / g'(g^-1(beta_i)),
        and 0 for an empty sub-model.

    Why: a mixture of uniform distributions over the nested sets X_i, weighted gamma_i, has
    density sum_i gamma_i / |X_i| on x's level; the staircase of f = g^-1(F) steps up by
    (beta_i - beta_(i-1)) / g'(g^-1(beta_i)) at level i; |X_i| = exp(h(G_i)) for a uniform
    G_i. With beta_i = i/N every width is 1/N and this is the paper's formula (Algorithm 1,
    line 8); the width factor is the same derivation for the staircase's actual steps (e.g.
    0.5, 0.3, 0.1 for betas 0.5, 0.8, 0.9). g, the link between density and ASR, is unknown
    for backdoors (the paper leaves it undefined); taking it linear (g' constant) is this
    repository's heuristic, and h is the MINE estimate, a lower bound.
    """
    mi, empty = torch.as_tensor(mi, dtype=torch.float64), torch.as_tensor(empty)
    widths = step_widths(betas)
    if not (mi.shape == empty.shape == widths.shape) or not torch.isfinite(mi).all():
        raise ValueError(f"need one finite MI estimate, empty flag and beta per sub-model, got "
                         f"{mi.tolist()}, {empty.tolist()}, {widths.tolist()}")
    logits = torch.where(empty, torch.full_like(mi, -math.inf), mi + widths.log())
    if torch.isinf(logits).all():
        raise ValueError("every sub-model is empty: no mixture to weight")
    return torch.softmax(logits, 0).float()


# ---------------------------------------------------------------------------------------------
# Cached banks with their evaluation

def bank_trigger_shape(cfg, size_free: bool = False) -> tuple:
    """What a bank's generators output: (3, 3, 3) triggers of the paper's assumed size, or
    size-free (4, S, S) colour and transparency, S = unknown_size.max_size."""
    if not size_free:
        return (3, 3, 3)
    size = cfg.unknown_size.max_size
    return (4, size, size)


def bank_spec(ctx, parent_key, members, section="mesa", size_free=False) -> dict:
    """The spec of a bank of `members` trained with config section `section` (stages.MESA_BANK
    or DETECTION_BANK, their size-free stages with `size_free`) against the classifier keyed
    `parent_key`."""
    return BANK_STAGES[section, size_free].spec(
        ctx.cfg, parent_key, members=[asdict(m) for m in members],
        trigger_shape=list(bank_trigger_shape(ctx.cfg, size_free)), f_images="non-target")


# The DV bound of a trained T is >= 0 up to sampling noise (the constant T = 0 scores exactly
# 0), and healthy runs here score 0.008-3.3 nats; an estimate below -1 nat means MINE's
# statistics network diverged (e.g. -1e11 nats at mesa.lr = 1000): it is no entropy estimate.
MI_FLOOR_NATS = -1.0


@torch.no_grad()
def evaluate_bank(ctx: Context, classifier, generators, stats, members, n, images, labels,
                  seed=0, advice="") -> list:
    """Per member: asr and mean target softmax of n sampled triggers (one per image of another
    class than its target), the MI (entropy) estimate, and `empty` (mean softmax below beta:
    the paper's empty sub-model); a size-free bank's also opaque_pixels, the mean over samples
    of the summed transparency (a trigger's area in pixels). An MI estimate that is not
    finite or below MI_FLOOR_NATS raises NonFiniteError (with `advice` appended)."""
    rows = []
    for i, member in enumerate(members):
        keep = (labels != member.target).nonzero().squeeze(1)
        pick = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
                    .to(keep.device)[:n]]
        result = attack_stats(ctx, classifier, images[pick], labels[pick],
                              GeneratorSampler(generators, [i]), member.target, seed=seed)
        z, z_marginal = (generators.noise(n, torch.Generator(ctx.device).manual_seed(seed + j),
                                          ctx.device) for j in (1, 2))
        samples = generators(z)
        mi = float(dv_bound(stats(z, samples), stats(z_marginal, samples))[i])
        if not mi >= MI_FLOOR_NATS:     # written so that NaN fails too
            raise NonFiniteError(f"MINE's estimate of I(G(z); z) for sub-model {i} ({member}) "
                                 f"is {mi:.3g} nats, below the floor {MI_FLOOR_NATS:g}: its "
                                 f"statistics network diverged and nothing was stored. {advice}")
        row = {**asdict(member), **result, "mi": mi,
               "empty": result["target_softmax"] < member.beta}
        if samples.shape[2] > images.shape[3]:                      # colour and transparency
            row["opaque_pixels"] = float(samples[i, :, images.shape[3]:].sum((1, 2, 3)).mean())
        rows.append(row)
    return rows


@dataclass
class Bank:
    """A trained bank: one generator per Member, addressed by the Member.

    log: (steps, K) tensors hinge, mi, softmax, asr (train_bank); evaluation: one row per
    member (evaluate_bank); key: its store key.
    """
    members: list
    generators: GeneratorBank
    log: dict
    evaluation: list
    key: str

    def position(self, member: Member) -> int:
        try:
            return self.members.index(member)
        except ValueError:
            raise KeyError(f"{member} is not in this bank; it holds {self.members}") from None

    def sampler(self, members=None, weights=None) -> GeneratorSampler:
        """A trigger source of one member or a mixture (default: every member, uniform)."""
        members = self.members if members is None else list(members)
        return GeneratorSampler(self.generators, [self.position(m) for m in members], weights)

    def entropy_sampler(self, members=None) -> GeneratorSampler | None:
        """The mixture of `members` (default all) weighted as Algorithm 1 (entropy_weights:
        MI estimates and empty flags of the evaluation, the members' step widths); None when
        every one of them is empty, where Algorithm 1 defines no mixture."""
        members = self.members if members is None else list(members)
        rows = [self.evaluation_of(m) for m in members]
        if all(r["empty"] for r in rows):
            return None
        weights = entropy_weights([r["mi"] for r in rows], [bool(r["empty"]) for r in rows],
                                  [m.beta for m in members])
        return self.sampler(members, weights)

    def sample(self, member: Member, n: int, generator=None) -> torch.Tensor:
        """n triggers (n, C, h, w) in (0, 1) of one member: (n, 3, 3, 3), or size-free
        (n, 4, S, S) colour and transparency."""
        return self.sampler([member]).sample(n, generator)

    def evaluation_of(self, member: Member) -> dict:
        return self.evaluation[self.position(member)]


def mesa_bank(ctx: Context, classifier, parent_key, members, setting="mesa",
              desc="MESA", size_free=False) -> Bank:
    """The Bank of `members` against `classifier`, trained once under config section
    `setting` ("mesa" or "detection"), size-free or of 3x3 triggers, and cached.

    Generators model the defender's 8K split; the evaluation rows are measured on the same
    split (sampled with cfg.seed). parent_key: the store key of the classifier (e.g.
    Backdoor.key).
    """
    members = list(members)
    if len(set(members)) != len(members):
        raise ValueError(f"a bank's members must be distinct, got {members}")
    spec = bank_spec(ctx, parent_key, members, setting, size_free)
    splits, seed, mcfg = ctx.splits, ctx.cfg.seed, getattr(ctx.cfg, setting)
    trigger_shape = bank_trigger_shape(ctx.cfg, size_free)

    def build():
        generators, stats, log = train_bank(
            ctx, classifier, members, mcfg, splits.defense_images, splits.defense_labels,
            trigger_shape, desc=desc, setting=setting,
            transparency_cost=ctx.cfg.unknown_size.transparency_cost if size_free else 0.0)
        rows = evaluate_bank(ctx, classifier, generators, stats, members, mcfg.eval_samples,
                             splits.defense_images, splits.defense_labels, seed,
                             _divergence_advice(setting, mcfg, members))
        return {"generators": {k: v.cpu() for k, v in generators.state_dict().items()},
                "log": log, "evaluation": rows}

    record = ctx.store.get_or_build(spec["stage"], spec, build)
    generators = GeneratorBank(len(members), mcfg.noise_dim, mcfg.hidden, trigger_shape,
                               seeds=[m.seed for m in members])
    generators.load_state_dict(record["generators"])
    return Bank(members, generators.to(ctx.device).eval(), record["log"],
                record["evaluation"], spec_key(spec))


# ---------------------------------------------------------------------------------------------
# Stages: target-class detection (02), the hyper-parameter study (03), the staircase (04, 05)

def detection_members(cfg, num_classes: int) -> list:
    """One Member per candidate target class, at the detection section's beta and alpha."""
    det = cfg.detection
    return [Member(det.beta, det.alpha, c, cfg.seed * 1000 + c) for c in range(num_classes)]


def detect_target(ctx: Context, backdoor: Backdoor, size_free=False) -> list:
    """One generator per class (one bank, size-free with `size_free`) against a backdoored
    model: Step 1 of the paper's defence (section 3.3). Rows per class: asr and
    target_softmax of its sampled triggers on the held-out eval split (images it never
    trained on, outside the class), train_asr on the defender's split it trained on, mi, and
    `flagged` (asr above cfg.detection.threshold)."""
    cfg = ctx.cfg
    members = detection_members(cfg, ctx.splits.num_classes)
    classifier = backdoor.model(ctx)
    bank = mesa_bank(ctx, classifier, backdoor.key, members, "detection",
                     desc=f"detection {backdoor.trigger}" + (" size-free" if size_free else ""),
                     size_free=size_free)
    rows = []
    for member, trained in zip(members, bank.evaluation):
        held_out = attack_stats(ctx, classifier, ctx.splits.eval_images,
                                ctx.splits.eval_labels, bank.sampler([member]), member.target,
                                seed=cfg.seed)
        rows.append({"trigger": backdoor.trigger, "class": member.target,
                     "asr": held_out["asr"], "target_softmax": held_out["target_softmax"],
                     "train_asr": trained["asr"], "mi": trained["mi"],
                     "flagged": held_out["asr"] > cfg.detection.threshold,
                     "true_target": member.target == backdoor.target})
    return rows


def study_settings(cfg) -> list:
    """Fig. 3's settings as (alpha, beta): alpha swept at beta = study.beta, beta swept at
    alpha = mesa.alpha (the shared setting appears once)."""
    settings = [(alpha, cfg.study.beta) for alpha in cfg.study.alphas]
    settings += [(cfg.mesa.alpha, beta) for beta in cfg.mesa.betas]
    return list(dict.fromkeys(settings))


def study_members(cfg) -> list:
    """Every Fig. 3 setting from each of study.seeds seeds, listed seed by seed. Within one
    seed all settings share the initialisation, noise, images and trigger positions, so they
    differ only in alpha and beta; across seeds, one setting shows what the seed alone does."""
    return [Member(beta, alpha, cfg.target, cfg.seed * 1000 + s)
            for s in range(cfg.study.seeds) for alpha, beta in study_settings(cfg)]


def hyperparameter_study(ctx: Context, backdoor: Backdoor) -> Bank:
    """Fig. 3's bank (study_members) against the backdoored model of study.trigger."""
    return mesa_bank(ctx, backdoor.model(ctx), backdoor.key, study_members(ctx.cfg),
                     desc="hyper-parameters")


def staircase_members(cfg) -> list:
    """The defence's staircase: one sub-model per beta of mesa.betas at mesa.alpha."""
    return [Member(beta, cfg.mesa.alpha, cfg.target, cfg.seed * 1000 + i)
            for i, beta in enumerate(cfg.mesa.betas)]


def staircase_bank(ctx: Context, backdoor: Backdoor, size_free=False) -> Bank:
    """The staircase's Bank for one backdoored model (04 retrains with it, 05 draws it), or
    its size-free twin (09): the same members, colour and transparency over S x S."""
    return mesa_bank(ctx, backdoor.model(ctx), backdoor.key, staircase_members(ctx.cfg),
                     desc=f"MESA {backdoor.trigger}" + (" size-free" if size_free else ""),
                     size_free=size_free)
