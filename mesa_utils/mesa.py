"""MESA: max-entropy staircase approximator (Algorithms 1-2 of the paper).

A bank of K generators G_i, each with its own (beta_i, alpha_i, target class c_i), is trained
in one loop: every step draws K x B noise vectors, pastes the K x B triggers onto K x B images
of the defender's split and runs ONE pass of the frozen classifier over them. Generator loss per
member (paper, eq. 4):

    L_i = mean_z max(0, beta_i - F_i(G_i(z) + noise)) - alpha_i * I_T(G_i(z); z')

with F_i the classifier's softmax of class c_i and I_T the Donsker-Varadhan lower bound of a
MINE statistics network T_i (trained in alternation, with MINE's moving-average correction).
Every member draws its noise, images and positions from its own seeded stream, so a bank
reproduces K generators trained one by one (tests/test_mesa.py).
"""
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import MesaConfig, to_dict
from .data import normalize
from .models import GeneratorBank, StatisticsBank, frozen
from .store import spec_key
from .triggers import apply_trigger
from .store import NonFiniteError
from .train import (CHECK_EVERY, Context, FiniteGuard, attack_stats, autocast, backdoor_spec,
                    backdoored_model)


@dataclass(frozen=True)
class Member:
    """One sub-model of a bank: its threshold beta, entropy weight alpha and target class."""
    beta: float
    alpha: float
    target: int


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

def _draw(streams, b, noise_dim, n_images, high, trigger_shape, device):
    """Each member's randomness for one step from its own stream, stacked to (K, B, ...):
    noise, marginal noise, image indices, trigger corners, trigger jitter."""
    draws = []
    for g in streams:
        draws.append((torch.rand(b, noise_dim, generator=g, device=device),
                      torch.rand(b, noise_dim, generator=g, device=device),
                      torch.randint(n_images, (b,), generator=g, device=device),
                      (torch.rand(b, 2, generator=g, device=device) * high).long(),
                      torch.randn(b, *trigger_shape, generator=g, device=device)))
    return [torch.stack(column) for column in zip(*draws)]


CPU_CLASSIFIER_CHUNK = 128  # images per classifier forward on a CPU (see train_bank)


def _divergence_advice(setting, mcfg, members) -> str:
    return (f"Lower {setting}.lr (now {mcfg.lr:g}) or the entropy weight alpha (largest in "
            f"this bank: {max(m.alpha for m in members):g}).")


def train_bank(ctx: Context, classifier, members, mcfg: MesaConfig, images, labels, seeds,
               trigger_shape=(3, 3, 3), desc="MESA", setting="mesa"):
    """Train one generator (and one T) per member on uint8 `images` (N, H, W, C).

    The classifier is frozen in place. Returns (generators, statistics, log) with log a dict
    of (steps, K) tensors: hinge, mi, softmax (mean target softmax), asr (share of samples
    classified as the target among images of other classes). `setting` names mcfg's config
    section ("mesa", "detection") in the NonFiniteError raised when training diverges.
    """
    device, k, b = ctx.device, len(members), mcfg.batch_size
    classifier = frozen(classifier)
    generators = GeneratorBank(k, mcfg.noise_dim, mcfg.hidden, trigger_shape, seeds).to(device)
    stats = StatisticsBank(k, mcfg.noise_dim, mcfg.hidden, trigger_shape, seeds).to(device)
    opt_g = torch.optim.Adam(generators.parameters(), lr=mcfg.lr, betas=mcfg.adam_betas)
    opt_t = torch.optim.Adam(stats.parameters(), lr=mcfg.lr, betas=mcfg.adam_betas)
    betas = torch.tensor([m.beta for m in members], device=device)[:, None]      # (K, 1)
    alphas = torch.tensor([m.alpha for m in members], device=device)
    targets = torch.tensor([m.target for m in members], device=device)          # (K,)
    streams = [torch.Generator(device).manual_seed(s) for s in seeds]
    height, width = images.shape[1:3]
    high = torch.tensor([height - trigger_shape[1] + 1, width - trigger_shape[2] + 1],
                        device=device)
    # One K x B forward suits a GPU; a CPU is fastest per image near 128 images (cache), so
    # there the batch goes through in pieces: same result, graph and gradients.
    chunk = k * b if device.type == "cuda" else CPU_CLASSIFIER_CHUNK
    log = {name: [] for name in ("hinge", "mi", "softmax", "asr")}   # (K,) per step, on device
    log_ema = None
    guard = FiniteGuard(desc, mcfg.steps, _divergence_advice(setting, mcfg, members), device)
    generators.train()
    bar = tqdm(range(mcfg.steps), desc=desc, leave=False)
    for step in bar:
        z, z_marginal, index, corner, jitter = _draw(
            streams, b, mcfg.noise_dim, len(images), high, trigger_shape, device)
        x = generators(z)                                                   # (K, B, C, h, w)
        log_ema, t_bound = mine_step(stats, opt_t, z, x.detach(), z_marginal, log_ema,
                                     mcfg.mine_ema_rate)
        stats.requires_grad_(False)  # the G step differentiates through T, not T itself
        mi = dv_bound(stats(z, x), stats(z_marginal, x))                    # (K,)
        stats.requires_grad_(True)
        # F term: noisy triggers (authors' std 0.1, unclamped) on K x B images, one (chunked) pass.
        batch = normalize(images[index.flatten()], ctx.splits.mean, ctx.splits.std)
        pasted = apply_trigger(batch, (x + mcfg.trigger_noise * jitter).flatten(0, 1),
                               corner.flatten(0, 1), mean=ctx.splits.mean, std=ctx.splits.std)
        with autocast(device, ctx.amp):
            logits = torch.cat([classifier(part) for part in pasted.split(chunk)])
        probs = logits.float().softmax(1).view(k, b, -1)
        softmax = probs.gather(2, targets.view(k, 1, 1).expand(k, b, 1)).squeeze(2)  # (K, B)
        hinge = F.relu(betas - softmax).mean(1)
        loss = (hinge - alphas * mi).sum()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        with torch.no_grad():
            other = labels[index] != targets[:, None]
            hit = (probs.argmax(2) == targets[:, None]) & other
            asr = hit.sum(1) / other.sum(1).clamp(min=1)
        guard.watch(step, loss, t_bound, log_ema)
        for name, value in (("hinge", hinge), ("mi", mi), ("softmax", softmax.mean(1)),
                            ("asr", asr)):
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
    """Triggers (n, C, h, w) in (0, 1) from a bank: one member, or a mixture of members.

    weights: mixture weights gamma over `members` (default uniform 1/N, the paper's
    practical choice; `entropy_weights` gives Algorithm 1's). Calling the sampler on
    normalised images pastes one fresh trigger per image: a trigger source for poisoning.
    """

    def __init__(self, generators: GeneratorBank, members=None, weights=None, mean=None,
                 std=None):
        self.generators = generators.eval()
        self.members = list(range(generators.k)) if members is None else list(members)
        if not self.members:
            raise ValueError("a sampler needs at least one member")
        weights = torch.ones(len(self.members)) if weights is None else torch.as_tensor(
            weights, dtype=torch.float32)
        if weights.shape != (len(self.members),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(self.members)} non-negative numbers with a "
                             f"positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.mean, self.std = mean, std

    @torch.no_grad()
    def sample(self, n, generator=None, return_members=False):
        device = next(self.generators.parameters()).device
        pick = torch.multinomial(self.weights.to(device), n, replacement=True,
                                 generator=generator)                        # (n,) positions
        member = torch.tensor(self.members, device=device)[pick]
        z = self.generators.noise(n, generator, device)                      # (K, n, nz)
        triggers = self.generators(z)[member, torch.arange(n, device=device)]
        return (triggers, member) if return_members else triggers

    def __call__(self, images, generator=None):
        return apply_trigger(images, self.sample(len(images), generator), generator=generator,
                             mean=self.mean, std=self.std)


def entropy_weights(mi: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's gamma_i proportional to exp(h(G_i)), with h estimated by the MI bound,
    zero for empty sub-models (g taken linear, as g is unknown for backdoors)."""
    logits = torch.where(empty, torch.full_like(mi, -math.inf), mi)
    if torch.isinf(logits).all():
        raise ValueError("every sub-model is empty: no mixture to weight")
    return torch.softmax(logits, 0)


# ---------------------------------------------------------------------------------------------
# Cached banks with their evaluation

def bank_spec(parent_key, members, mcfg, seeds, trigger_shape=(3, 3, 3)) -> dict:
    return {"stage": "mesa", "parent": parent_key, "members": [asdict(m) for m in members],
            "mesa": to_dict(mcfg), "seeds": list(seeds), "trigger_shape": list(trigger_shape)}


# The DV bound of a trained T is >= 0 up to sampling noise (the constant T = 0 scores exactly
# 0), and healthy runs here score 0.008-3.3 nats; an estimate below -1 nat means MINE's
# statistics network diverged (e.g. -1e11 nats at mesa.lr = 1000): it is no entropy estimate.
MI_FLOOR_NATS = -1.0


@torch.no_grad()
def evaluate_bank(ctx: Context, classifier, generators, stats, members, n, images, labels,
                  seed=0, advice="") -> list:
    """Per member: asr and mean target softmax of n sampled triggers (one per image), the MI
    (entropy) estimate, and `empty` (mean softmax below beta: the paper's empty sub-model).
    An MI estimate that is not finite or below MI_FLOOR_NATS raises NonFiniteError (with
    `advice` appended)."""
    rows = []
    for i, member in enumerate(members):
        keep = (labels != member.target).nonzero().squeeze(1)
        pick = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
                    .to(keep.device)[:n]]
        sampler = GeneratorSampler(generators, [i], mean=ctx.splits.mean, std=ctx.splits.std)
        result = attack_stats(ctx, classifier, images[pick], labels[pick], sampler,
                              member.target, seed=seed)
        z, z_marginal = (generators.noise(n, torch.Generator(ctx.device).manual_seed(seed + j),
                                          ctx.device) for j in (1, 2))
        samples = generators(z)
        mi = float(dv_bound(stats(z, samples), stats(z_marginal, samples))[i])
        if not mi >= MI_FLOOR_NATS:     # written so that NaN fails too
            raise NonFiniteError(f"MINE's estimate of I(G(z); z) for sub-model {i} ({member}) "
                                 f"is {mi:.3g} nats, below the floor {MI_FLOOR_NATS:g}: its "
                                 f"statistics network diverged and nothing was stored. {advice}")
        rows.append({**asdict(member), "member": i, **result, "mi": mi,
                     "empty": result["target_softmax"] < member.beta})
    return rows


def mesa_bank(ctx: Context, classifier, parent_key, members, mcfg: MesaConfig, seed=0,
              desc="MESA", seeds=None, setting="mesa"):
    """(generators, record) for `members` against `classifier`, trained once and cached.

    Generators model the defender's 8K split; record holds the per-step log, the evaluation
    rows of `evaluate_bank` (on the same split, sampled with `seed`) and the bank's store key.
    seeds: one per member (initialisation and training randomness); default: distinct seeds
    seed * 1000 + i. setting: mcfg's config section, named when training diverges.
    """
    members = list(members)
    seeds = [seed * 1000 + i for i in range(len(members))] if seeds is None else list(seeds)
    spec = bank_spec(parent_key, members, mcfg, seeds)
    splits = ctx.splits

    def build():
        generators, stats, log = train_bank(ctx, classifier, members, mcfg,
                                            splits.defense_images, splits.defense_labels,
                                            seeds, desc=desc, setting=setting)
        rows = evaluate_bank(ctx, classifier, generators, stats, members, mcfg.eval_samples,
                             splits.defense_images, splits.defense_labels, seed,
                             _divergence_advice(setting, mcfg, members))
        return {"generators": {k: v.cpu() for k, v in generators.state_dict().items()},
                "log": log, "evaluation": rows}

    record = ctx.store.get_or_build("mesa", spec, build)
    generators = GeneratorBank(len(members), mcfg.noise_dim, mcfg.hidden, seeds=seeds)
    generators.load_state_dict(record["generators"])
    return generators.to(ctx.device).eval(), {**record, "key": spec_key(spec)}


# ---------------------------------------------------------------------------------------------
# Stages: target-class detection (02) and the hyper-parameter analysis (03)

def detect_target(ctx: Context, trigger_id: int) -> list:
    """One generator per class (one bank) against the backdoored model of `trigger_id`.

    Rows per class: asr and target_softmax of its sampled triggers, mi, and `flagged` (asr
    above cfg.detection_threshold): Step 1 of the paper's defence (section 3.3).
    """
    cfg = ctx.cfg
    model, _ = backdoored_model(ctx, trigger_id)
    det = cfg.detection
    members = [Member(det.betas[0], det.alpha, c) for c in range(ctx.splits.num_classes)]
    _, record = mesa_bank(ctx, model, spec_key(backdoor_spec(ctx, trigger_id)), members, det,
                          cfg.seed, desc=f"detection {trigger_id}", setting="detection")
    return [{"trigger": trigger_id, "class": row["target"], "asr": row["asr"],
             "target_softmax": row["target_softmax"], "mi": row["mi"],
             "flagged": row["asr"] > cfg.detection_threshold,
             "true_target": row["target"] == cfg.target} for row in record["evaluation"]]


def hyperparameter_members(cfg) -> list:
    """Fig. 3's settings: alpha swept at beta = hp_beta, beta swept at alpha = mesa.alpha
    (the shared setting appears once)."""
    members = [Member(cfg.hp_beta, alpha, cfg.target) for alpha in cfg.hp_alphas]
    members += [Member(beta, cfg.mesa.alpha, cfg.target) for beta in cfg.mesa.betas]
    return list(dict.fromkeys(members))


def hyperparameter_study(ctx: Context, classifier):
    """Fig. 3's bank against `classifier` (the hp_trigger's backdoored model): every setting
    of `hyperparameter_members` trained from each of cfg.hp_seeds seeds.

    Returns (generators, record, members, seeds), listed seed by seed. Within one seed all
    settings share the initialisation, noise, images and trigger positions, so they differ
    only in alpha and beta; across seeds, one setting shows what the seed alone changes.
    """
    cfg = ctx.cfg
    settings = hyperparameter_members(cfg)
    members = settings * cfg.hp_seeds
    seeds = [cfg.seed * 1000 + s for s in range(cfg.hp_seeds) for _ in settings]
    generators, record = mesa_bank(ctx, classifier, spec_key(backdoor_spec(ctx, cfg.hp_trigger)),
                                   members, cfg.mesa, cfg.seed, desc="hyper-parameters",
                                   seeds=seeds)
    return generators, record, members, seeds


def study_index(members, seeds) -> dict:
    """{(alpha, beta, seed): position} of a hyperparameter_study bank's members."""
    return {(m.alpha, m.beta, s): i for i, (m, s) in enumerate(zip(members, seeds))}


def nesting_pairs(cfg, members, seeds) -> list:
    """(comparison, inner, outer) member positions to compare: per seed, each beta of
    mesa.betas inside the next lower one ("staircase"); and the reference setting
    (hp_beta, mesa.alpha) of a later seed inside an earlier one's ("same setting, other
    seed": identical valid sets, the yardstick)."""
    index, alpha = study_index(members, seeds), cfg.mesa.alpha
    seed_list, betas = sorted(set(seeds)), sorted(cfg.mesa.betas)
    pairs = [("staircase", index[(alpha, high, s)], index[(alpha, low, s)])
             for s in seed_list for low, high in zip(betas, betas[1:])]
    pairs += [("same setting, other seed", index[(alpha, cfg.hp_beta, t)],
               index[(alpha, cfg.hp_beta, s)]) for s, t in itertools.combinations(seed_list, 2)]
    return pairs


def nesting_table(pairs, samples, planes, labels):
    """DataFrame of `coverage` both ways for each (comparison, inner, outer) of `pairs`: in
    the samples' own space (list of (n, ...) tensors) and, columns *_2d, in the 2-D `planes`
    (list of (n, 2) arrays, e.g. pca_2d's: what the eye judges in Fig. 3)."""
    import pandas as pd
    planes = [torch.as_tensor(p) for p in planes]
    return pd.DataFrame([{"comparison": kind, "inner": labels[i], "outer": labels[j],
                          "inner_in_outer": coverage(samples[i], samples[j]),
                          "outer_in_inner": coverage(samples[j], samples[i]),
                          "inner_in_outer_2d": coverage(planes[i], planes[j]),
                          "outer_in_inner_2d": coverage(planes[j], planes[i])}
                         for kind, i, j in pairs])


def hyperparameter_claims(cfg, settings, nesting):
    """The paper's Fig. 3 claims checked on one run: DataFrame (claim, holds, cases), holds
    counting the seeds (or pairs) where the claim is true. settings: rows with seed, alpha,
    beta, asr and distinct (distinct_triggers); nesting: a nesting_table."""
    import pandas as pd
    by_seed = settings.set_index(["seed", "alpha", "beta"])

    def column(name, alpha):   # per seed, at beta = hp_beta
        return by_seed[name].xs((alpha, cfg.hp_beta), level=["alpha", "beta"]).to_numpy()

    low, ref, high = min(cfg.hp_alphas), cfg.mesa.alpha, max(cfg.hp_alphas)
    staircase = nesting[nesting.comparison == "staircase"]
    other_seed = nesting[nesting.comparison != "staircase"]
    checks = {
        f"alpha {low:g} narrower than alpha {ref:g} (fewer distinct triggers)":
            column("distinct", low) < column("distinct", ref),
        f"alpha {low:g} collapses (under a quarter of alpha {ref:g}'s distinct triggers)":
            column("distinct", low) < 0.25 * column("distinct", ref),
        f"alpha {high:g} loses ASR (over 10 points below alpha {ref:g})":
            column("asr", high) < column("asr", ref) - 0.1,
        "higher-beta set leans inside the lower one (inner_in_outer > outer_in_inner)":
            (staircase.inner_in_outer > staircase.outer_in_inner).to_numpy(),
        "higher-beta set lies mostly inside the lower one (inner_in_outer > 0.5)":
            (staircase.inner_in_outer > 0.5).to_numpy(),
        "one setting from two seeds: either covers half the other (coverage > 0.5)":
            (other_seed[["inner_in_outer", "outer_in_inner"]].max(axis=1) > 0.5).to_numpy(),
    }
    return pd.DataFrame([{"claim": claim, "holds": int(holds.sum()), "cases": len(holds)}
                         for claim, holds in checks.items()])


def spread(samples: torch.Tensor) -> float:
    """Total variance (trace of the covariance) of flattened samples (n, ...): how widely a
    generator's triggers spread; near 0 when it collapses onto a few points."""
    flat = samples.flatten(1).double()
    return float(flat.var(0).sum())


def thin(points: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices of points (n, d) kept so that no two kept points lie closer than min_distance
    (greedy, first come first kept)."""
    kept = []
    for i, p in enumerate(points):
        if not kept or np.min(np.linalg.norm(points[kept] - p, axis=1)) >= min_distance:
            kept.append(i)
    return np.array(kept, dtype=int)


def distinct_triggers(samples: torch.Tensor, radius: float = 0.5) -> int:
    """How many clearly different triggers the samples (n, ...) in [0, 1] hold: a greedy
    subset whose members lie at least `radius` apart (L2 over all pixel values; 0.5 is one
    value differing by half its range). Small when a generator collapses onto few points."""
    return len(thin(samples.flatten(1).double().cpu().numpy(), radius))


def coverage(inner: torch.Tensor, outer: torch.Tensor, quantile: float = 0.95) -> float:
    """Share of `inner` samples (n, ...) lying within the `quantile` of `outer`'s own
    nearest-neighbour distances from some `outer` sample: ~1 when inner's set is inside
    outer's (the staircase nesting X_(i+1) within X_i), lower when it reaches beyond."""
    a, b = inner.flatten(1).double(), outer.flatten(1).double()
    within = torch.cdist(b, b)
    within.fill_diagonal_(float("inf"))
    radius = torch.quantile(within.min(1).values, quantile)
    return float((torch.cdist(a, b).min(1).values <= radius).double().mean())


def pca_2d(groups):
    """Centred PCA fitted on all groups (n_i, ...) together (shared axes): the list of (n_i, 2)
    arrays and the share of the total variance the two components keep (0-1)."""
    from sklearn.decomposition import PCA
    flat = [g.flatten(1).cpu().numpy() for g in groups]
    pca = PCA(n_components=2).fit(np.concatenate(flat))
    return [pca.transform(f) for f in flat], float(pca.explained_variance_ratio_.sum())


def tsne_2d(samples: torch.Tensor, seed: int = 0) -> np.ndarray:
    """t-SNE embedding (n, 2) of flattened samples (n, ...), as in the paper's Fig. 5."""
    from sklearn.manifold import TSNE
    flat = samples.flatten(1).cpu().numpy()
    perplexity = min(30.0, max(2.0, (len(flat) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(flat)


def detection_summary(detection, target: int):
    """Per trigger: the true target's ASR, the best other class's, their margin, the flagged
    classes and whether exactly the true target was flagged. detection: rows of
    detect_target as a DataFrame."""
    import pandas as pd
    rows = []
    for trigger, part in detection.groupby("trigger"):
        flagged = sorted(int(c) for c in part[part.flagged]["class"])
        rows.append({"trigger": trigger,
                     "true_target_asr": part[part["class"] == target].asr.max(),
                     "best_other_asr": part[part["class"] != target].asr.max(),
                     "flagged_classes": flagged, "correct": flagged == [target]})
    table = pd.DataFrame(rows)
    table["margin"] = table.true_target_asr - table.best_other_asr
    return table
