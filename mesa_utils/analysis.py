"""Measures, tables and checks computed on the stages' results (the method is in mesa.py and
defense.py): spread, distinct triggers and k-NN entropy of sample sets, the k-NN overlap of
one set with another, 2-D embeddings, the validity matrix and the Fig. 3 claims, the detection
and defence summaries beside the paper's numbers, and each notebook's healthy-run check.

Sample sets are tensors (n, ...) of triggers in [0, 1]; tables are pandas DataFrames.
"""
import itertools
import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from .intervals import bootstrap_interval
from .mesa import entropy_weights
from .methods import CONTRAST_MESA, CONTROLS, METHODS, method_label, paper_result


# ---------------------------------------------------------------------------------------------
# Sample sets: spread, distinct triggers, entropy, overlap, embeddings

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


def neighbour_distances(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance (n,) of each of `points` (n, d) to its k-th nearest other point."""
    if not 1 <= k < len(points):
        raise ValueError(f"k-th neighbour needs 1 <= k < n points, got k={k}, n={len(points)}")
    within = torch.cdist(points, points)
    within.fill_diagonal_(float("inf"))
    return within.kthvalue(k, 1).values


def manifold_share(points: torch.Tensor, support: torch.Tensor, k: int = 3) -> float:
    """Share (0-1) of `points` (n, ...) inside `support`'s k-NN manifold: the union of balls
    around each support sample reaching its k-th nearest support neighbour (Kynkaanniemi et
    al., NeurIPS 2019: precision of a generated set G against reference R is
    manifold_share(G, R), recall manifold_share(R, G)).

    Its scale is set by yardsticks, not by theory: a second draw of the same distribution
    scores high but below 1, lower in more dimensions and higher for larger k (1,000 points,
    k = 3: 0.97 in 2-D, 0.70 in 27-d); disjoint sets score 0; a set inside a wider one scores
    ~1 one way and about the volume ratio the other way (tests/test_analysis.py)."""
    a, b = points.flatten(1).double(), support.flatten(1).double()
    radii = neighbour_distances(b, k)
    return float((torch.cdist(a, b) <= radii).any(1).double().mean())


# Distances below this count as this in knn_entropy: 0.001 in L2 over a trigger's 27 values
# is far below one grey level (1/255 = 0.004), so samples closer than it are the same trigger.
ENTROPY_RESOLUTION = 1e-3


def knn_entropy(samples: torch.Tensor, k: int = 3, resolution: float = ENTROPY_RESOLUTION):
    """Kozachenko-Leonenko estimate of the differential entropy (nats) of samples (n, ...):

        h = psi(n) - psi(k) + log V_d + d * mean_i log eps_i

    with eps_i the distance to the k-th nearest other sample, V_d the volume of the unit ball
    in d dimensions. Unlike counts of distinct triggers it does not grow with n (it
    converges). For triggers in [0, 1]^d, 0 nats is the uniform distribution over the whole
    cube and every other distribution scores below 0 (up to the estimator's bias near the
    cube's faces, where neighbours are missing: +0.1 nats for 3,000 uniform points in 3-D;
    the bias is shared by sets compared at the same n and d); a generator collapsed onto a few
    points scores near the floor d * log(resolution) + const (distances below `resolution`
    count as `resolution`, so repeated points give a finite floor, not -inf)."""
    flat = samples.flatten(1).double()
    n, d = flat.shape
    eps = neighbour_distances(flat, k).clamp(min=resolution)
    log_unit_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    return float(_digamma(n) - _digamma(k) + log_unit_ball + d * eps.log().mean())


def _digamma(m: int) -> float:
    """psi(m) for a positive integer m: the harmonic number H_(m-1) minus Euler's gamma."""
    return sum(1 / i for i in range(1, m)) - 0.5772156649015329


def distinct_curve(samples: torch.Tensor, sizes, radii) -> pd.DataFrame:
    """distinct_triggers of the first n samples for each n of `sizes` and each radius: rows
    (n, radius, distinct). A generator that collapses stops adding distinct triggers as n
    grows; one that spreads keeps adding them until its set is filled at that radius."""
    return pd.DataFrame([{"n": n, "radius": r, "distinct": distinct_triggers(samples[:n], r)}
                         for n in sizes for r in radii])


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


# ---------------------------------------------------------------------------------------------
# Fig. 3: the staircase comparisons and the paper's claims (notebook 03)

def validity_table(softmax: dict, betas) -> pd.DataFrame:
    """The validity matrix V as tidy rows: for each sub-model j (softmax: {Member: (n,) F of
    its n sampled triggers}) and each threshold beta_i of `betas`, the share of its samples
    with F > beta_i. Columns: member, alpha, beta (the sub-model's), seed, threshold, valid.

    Where threshold == beta the value is the sub-model's precision (its samples inside its
    own valid set); a lower-beta sub-model's row at a higher threshold says how much of it
    lies in that threshold's valid set; its precision minus that is the share in the band
    between the two betas, which the higher one excludes."""
    return pd.DataFrame([{"member": m.label(), "alpha": m.alpha, "beta": m.beta,
                          "seed": m.seed, "threshold": t,
                          "valid": float((torch.as_tensor(f) > t).double().mean())}
                         for m, f in softmax.items() for t in sorted(betas)])


def overlap_pairs(cfg, members) -> list:
    """(comparison, inner, outer) Members of a study bank to compare with manifold_share:
    - "staircase": per seed, each beta of mesa.betas (at mesa.alpha) against the next lower;
    - "second draw": per seed, each of those sub-models against a second draw of itself
      (inner is outer): the yardstick of an identical distribution;
    - "other seed": the reference setting (mesa.alpha, study.beta) of a later seed against
      an earlier one's: identical valid sets, generators trained apart."""
    alpha, betas = cfg.mesa.alpha, sorted(cfg.mesa.betas)
    seeds = sorted({m.seed for m in members})

    def member(beta, seed):
        return next(m for m in members if (m.alpha, m.beta, m.seed) == (alpha, beta, seed))

    pairs = [("staircase", member(high, s), member(low, s))
             for s in seeds for low, high in zip(betas, betas[1:])]
    pairs += [("second draw", member(b, s), member(b, s)) for s in seeds for b in betas]
    pairs += [("other seed", member(cfg.study.beta, t), member(cfg.study.beta, s))
              for s, t in itertools.combinations(seeds, 2)]
    return pairs


def overlap_table(pairs, samples: dict, redraws: dict, k: int = 3) -> pd.DataFrame:
    """manifold_share both ways for each (comparison, inner, outer) of `pairs` (samples and
    redraws: {Member: (n, ...)}, two independent draws; a member paired with itself is
    compared with its redraw). inner_in_outer is inner's precision against outer's support,
    outer_in_inner outer's: a set nested inside another scores high one way, lower the
    other."""
    rows = []
    for kind, inner, outer in pairs:
        a = redraws[inner] if inner == outer else samples[inner]
        rows.append({"comparison": kind, "inner": inner.label(), "outer": outer.label(),
                     "inner_in_outer": manifold_share(a, samples[outer], k),
                     "outer_in_inner": manifold_share(samples[outer], a, k)})
    return pd.DataFrame(rows)


def hyperparameter_claims(cfg, settings, overlap, validity):
    """The paper's Fig. 3 claims checked on one run: DataFrame (claim, holds, cases), holds
    counting the seeds (or pairs) where the claim is true. settings: rows with seed, alpha,
    beta, asr, distinct (distinct_triggers) and entropy (knn_entropy); overlap: an
    overlap_table; validity: a validity_table of the study's sub-models."""
    by_seed = settings.set_index(["seed", "alpha", "beta"])

    def column(name, alpha):   # per seed, at beta = study.beta
        return by_seed[name].xs((alpha, cfg.study.beta), level=["alpha", "beta"]).to_numpy()

    low, ref, high = min(cfg.study.alphas), cfg.mesa.alpha, max(cfg.study.alphas)
    betas = sorted(cfg.mesa.betas)
    staircase = overlap[overlap.comparison == "staircase"]
    second = overlap[overlap.comparison == "second draw"].set_index("outer")
    other_seed = overlap[overlap.comparison == "other seed"]
    # each staircase pair beside the yardstick of its outer (lower-beta) sub-model
    yardstick = second.loc[staircase.outer, "inner_in_outer"].to_numpy()
    # V at alpha = mesa.alpha. The band: the share of a lower-beta sub-model's samples valid
    # for its own beta but not for the next higher one, beta_lo < F <= beta_hi.
    v = validity[validity.alpha == ref].set_index(["seed", "beta", "threshold"]).valid
    band = np.array([v[(s, lo, lo)] - v[(s, lo, hi)] for s in sorted(validity.seed.unique())
                     for lo, hi in zip(betas, betas[1:])])
    precision = np.array([v[(s, b, b)] for s in sorted(validity.seed.unique()) for b in betas])
    checks = {
        f"alpha {low:g} narrower than alpha {ref:g} (lower k-NN entropy)":
            column("entropy", low) < column("entropy", ref),
        f"alpha {low:g} collapses (under a quarter of alpha {ref:g}'s distinct triggers)":
            column("distinct", low) < 0.25 * column("distinct", ref),
        f"alpha {high:g} loses ASR (over 10 points below alpha {ref:g})":
            column("asr", high) < column("asr", ref) - 0.1,
        "every staircase sub-model mostly valid for its own beta (precision V[i, i] > 0.8)":
            precision > 0.8,
        "a lower-beta sub-model expands into the band between its beta and the next (> 10% "
        "of its samples)": band > 0.1,
        "the higher-beta samples lie in the lower-beta support as much as the lower's own "
        "second draw (within 0.1)": staircase.inner_in_outer.to_numpy() >= yardstick - 0.1,
        "the lower-beta set reaches beyond the higher (outer_in_inner < inner_in_outer)":
            (staircase.outer_in_inner < staircase.inner_in_outer).to_numpy(),
        "one setting from two seeds: overlap at least half the second-draw yardstick":
            (other_seed[["inner_in_outer", "outer_in_inner"]].max(axis=1)
             >= 0.5 * second.inner_in_outer.mean()).to_numpy(),
    }
    return pd.DataFrame([{"claim": claim, "holds": int(holds.sum()), "cases": len(holds)}
                         for claim, holds in checks.items()])


def hyperparameter_findings(cfg, claims, summary, overlap, validity, staircase_validity) -> list:
    """03's findings as sentences: each claim (hyperparameter_claims) with its count, then at
    study.beta the spread and ASR per alpha (summary: settings aggregated per alpha and beta,
    columns entropy, entropy_min, entropy_max, distinct, asr, mi), the precision and band
    shares of the study's (validity) and the defence's (staircase_validity) staircases, and
    the k-NN overlap against its two yardsticks (overlap_table)."""
    by_alpha = summary[summary.beta == cfg.study.beta].set_index("alpha")
    low, ref, high = min(cfg.study.alphas), cfg.mesa.alpha, max(cfg.study.alphas)
    mean_of = overlap.groupby("comparison")[["inner_in_outer", "outer_in_inner"]].mean()
    betas = sorted(cfg.mesa.betas)

    def staircase_text(table):
        v = table.groupby(["beta", "threshold"]).valid.mean()
        return (", ".join(f"beta = {b:g} {100 * v[(b, b)]:.0f}%" for b in betas)
                + "; in the band up to the next beta: "
                + ", ".join(f"({lo:g}, {hi:g}]: {100 * (v[(lo, lo)] - v[(lo, hi)]):.0f}%"
                            for lo, hi in zip(betas, betas[1:])))
    return [*(f"{c.claim}: holds in **{c.holds} of {c.cases}**." for c in claims.itertuples()),
            f"At beta = {cfg.study.beta:g} (mean over seeds, range in brackets): alpha = {low:g} "
            f"has k-NN entropy {by_alpha.entropy[low]:.0f} nats [{by_alpha.entropy_min[low]:.0f}"
            f", {by_alpha.entropy_max[low]:.0f}] and {by_alpha.distinct[low]:.0f} distinct "
            f"triggers; alpha = {ref:g} {by_alpha.entropy[ref]:.0f} nats "
            f"[{by_alpha.entropy_min[ref]:.0f}, {by_alpha.entropy_max[ref]:.0f}] and "
            f"{by_alpha.distinct[ref]:.0f}; alpha = {high:g} {by_alpha.entropy[high]:.0f} nats "
            f"with ASR {100 * by_alpha.asr[high]:.0f}% against {100 * by_alpha.asr[ref]:.0f}% at "
            f"alpha = {ref:g}. Final MI estimates: " + ", ".join(
                f"alpha = {a:g} {by_alpha.mi[a]:.2f} nats" for a in sorted(by_alpha.index)) + ".",
            "Precision (own beta, the study's sub-models at alpha = "
            f"{ref:g}, mean over seeds): "
            + staircase_text(validity[validity.alpha == ref]) + ".",
            "The defence's staircases (04's sub-models, mean over triggers): precision "
            + staircase_text(staircase_validity) + ".",
            f"k-NN overlap: the higher-beta samples lie in the lower-beta generator's range at "
            f"{mean_of.inner_in_outer['staircase']:.2f} (the reverse "
            f"{mean_of.outer_in_inner['staircase']:.2f}), against "
            f"{mean_of.inner_in_outer['second draw']:.2f} for a second draw of one generator and "
            f"{mean_of.loc['other seed'].max():.2f} for one setting from two seeds."]


# ---------------------------------------------------------------------------------------------
# Detection (02) and defence (04) summaries


def detection_summary(detection, target: int):
    """Per trigger: the true target's ASR, the best other class's, their margin, the flagged
    classes and whether exactly the true target was flagged. detection: rows of
    detect_target as a DataFrame."""
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





# The findings of interval_finding, in words.
FINDINGS = {"MESA lower": "MESA's interval lies below the baseline's",
            "baseline lower": "the baseline's interval lies below MESA's",
            "overlap": "the intervals overlap"}


def interval_finding(mesa, baseline) -> str:
    """"MESA lower" when MESA's 95% interval (columns low_%, high_%) lies wholly below the
    baseline's, "baseline lower" when wholly above, else "overlap"."""
    return ("MESA lower" if mesa["high_%"] < baseline["low_%"] else
            "baseline lower" if mesa["low_%"] > baseline["high_%"] else "overlap")


def entropy_weight_table(staircase: pd.DataFrame) -> pd.DataFrame:
    """Algorithm 1's mixture weights (mesa.entropy_weights) from a staircase's evaluation rows
    (trigger, beta, mi, empty; one per sub-model): columns trigger, beta, mi, empty, gamma.
    A trigger whose every sub-model is empty has no mixture, and no rows here."""
    rows = []
    for trigger, part in staircase.groupby("trigger", sort=False):
        empty = part["empty"].astype(bool).tolist()
        if all(empty):
            continue
        gamma = entropy_weights(part.mi.tolist(), empty, part.beta.tolist())
        rows += [{"trigger": trigger, "beta": b, "mi": mi, "empty": e, "gamma": float(g)}
                 for b, mi, e, g in zip(part.beta, part.mi, empty, gamma)]
    return pd.DataFrame(rows, columns=["trigger", "beta", "mi", "empty", "gamma"])


def summarize(df):
    """Per method: mean after-defence ASR (%) over triggers (and baseline starts) with a 95%
    bootstrap interval over its runs, the worst run, the mean clean-accuracy change (points),
    beside the paper's numbers. "worst" grows with the number of runs: compare it only
    between methods with as many runs (column `runs`)."""
    labelled = df.assign(label=[method_label(m, b) for m, b in zip(df.method, df.beta)])
    order = [method_label("mesa", b) for b in sorted(df.beta.dropna().unique())]
    order += [m for m in METHODS if m != "mesa"]
    before = df.drop_duplicates("trigger")

    def asr_columns(asr):
        low, high = bootstrap_interval(asr.to_numpy())
        return {"mean_asr_%": 100 * asr.mean(), "mean_asr_low_%": 100 * low,
                "mean_asr_high_%": 100 * high, "worst_asr_%": 100 * asr.max()}
    rows = [{"method": "before defence", "runs": len(before), **asr_columns(before.asr_before),
             "clean_change_pts": 0.0, "paper": paper_result("before defence")}]
    for label in order:
        part = labelled[labelled.label == label]
        if len(part):
            rows.append({"method": label, "runs": len(part), **asr_columns(part.asr_after),
                         "clean_change_pts": 100 * (part.clean_after - part.clean_before).mean(),
                         "paper": paper_result(label)})
    return pd.DataFrame(rows).round(2)


# summarize's columns under the names of mean_table's (which interval_finding reads)
SUMMARY_COLUMNS = {"mean_asr_%": "mean_%", "mean_asr_low_%": "low_%",
                   "mean_asr_high_%": "high_%", "worst_asr_%": "worst_%"}


def defense_conclusions(summary: pd.DataFrame) -> list:
    """04's findings as sentences, from a summarize table of any methods that include
    CONTRAST_MESA and the baseline: each method's mean after-defence ASR with its 95% interval,
    CONTRAST_MESA set against the baseline (and the random-patch control, when run) by
    interval_finding, the worst runs beside the paper's contrast, the clean-accuracy cost."""
    table = summary.set_index("method").rename(columns=SUMMARY_COLUMNS)

    def text(method):
        row = table.loc[method]
        return (f"{row['mean_%']:.1f}% [{row['low_%']:.1f}, {row['high_%']:.1f}] over "
                f"{int(row['runs'])} runs, worst {row['worst_%']:.1f}%")
    mesa, baseline = table.loc[CONTRAST_MESA], table.loc["baseline"]
    others = [m for m in table.index if m.startswith("mesa") and m != CONTRAST_MESA]
    retrained = [m for m in table.index if m not in ("before defence", *CONTROLS)]
    lines = [f"Before the defence: ASR {text('before defence')}.",
             f"MESA's mixture (the variant every comparison uses): {text(CONTRAST_MESA)}" +
             ("; the other MESA variants: " + "; ".join(
                 f"{m} {table.loc[m, 'mean_%']:.1f}%" for m in others) if others else "") + ".",
             f"One reversed trigger (baseline): {text('baseline')}."]
    cleanse = [f"{text(m)} {where}" for m, where in (
        ("neural_cleanse", "at its place"),
        ("neural_cleanse_crop", "cut to its box at random places")) if m in table.index]
    if cleanse:
        lines.append(f"Neural Cleanse: {', '.join(cleanse)}.")
    if "ideal" in table.index:
        lines.append(f"Ideal defence (the true trigger): {text('ideal')}.")
    controls = [f"{label} {text(m)}" for m, label in (
        ("finetune", "fine-tuning with no trigger"), ("random_patch", "random 3x3 patches"))
        if m in table.index]
    if controls:
        against = ""
        if "random_patch" in table.index:
            below = interval_finding(mesa, table.loc["random_patch"]) == "MESA lower"
            against = (f"; MESA's mixture is {'below' if below else 'not below'} the "
                       "random-patch control (95% intervals)")
        lines.append(f"Controls: {'; '.join(controls)}{against}.")
    lines += [f"MESA's mixture against the baseline: "
              f"{FINDINGS[interval_finding(mesa, baseline)]}; worst runs {mesa['worst_%']:.1f}% "
              f"against {baseline['worst_%']:.1f}% (the paper: MESA's at most 9.1%, the "
              "baseline's up to 51.4%).",
              f"Clean accuracy changed by {table.loc[retrained, 'clean_change_pts'].min():+.1f} "
              f"to {table.loc[retrained, 'clean_change_pts'].max():+.1f} points over the "
              "retrained methods."]
    return lines


# ---------------------------------------------------------------------------------------------
# The hard-trigger screen's replication (08): does a second screen rank the triggers alike?

TOP_SHARE = 10 / 51     # "the top 10" of the 51 triggers, scaled to a screen of fewer


def spearman_rho(x, y) -> np.ndarray:
    """Spearman's rho of x and y (..., n) along the last axis (ties at their mean rank);
    nan where one of them is constant."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(-1) / np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))


def top_triggers(values: pd.Series, k: int) -> set:
    """The k triggers (index) of largest value, ties broken by the lower trigger id."""
    table = pd.DataFrame({"trigger": values.index, "value": values.to_numpy()})
    return set(table.sort_values(["value", "trigger"], ascending=[False, True]).trigger[:k])


def overlap_p_value(overlap: int, k: int, n: int) -> float:
    """P(at least `overlap` of one random k-subset of n lie in another k-subset): how often
    two unrelated rankings share that many of their top k (hypergeometric tail)."""
    return sum(math.comb(k, x) * math.comb(n - k, k - x) for x in range(overlap, k + 1)) \
        / math.comb(n, k)


def screen_agreement(first: pd.Series, second: pd.Series, resamples: int = 10_000,
                     seed: int = 0) -> dict:
    """How two screens agree on the triggers both hold. first, second: one value per trigger
    (index: trigger id; e.g. the held-out ASR after one retraining, in [0, 1]). Returns
    triggers (n, at least 4), rho (Spearman) with its 95% percentile bootstrap interval over
    triggers (rho_low, rho_high), top_k (round(TOP_SHARE x n): 10 of 51), top_overlap (how
    many of first's top_k are in second's), chance_overlap (top_k^2 / n, its mean for
    unrelated rankings) and top_overlap_p (overlap_p_value: the chance of at least as many
    for unrelated rankings)."""
    both = pd.concat({"first": first, "second": second}, axis=1, join="inner").dropna()
    n = len(both)
    if n < 4 or not np.isfinite(both.to_numpy()).all():
        raise ValueError(f"two screens need at least 4 shared triggers with finite values to "
                         f"compare, got {n}")
    x, y = both["first"].to_numpy(), both["second"].to_numpy()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (resamples, n))
    rhos = spearman_rho(x[draws], y[draws])
    k = max(1, round(TOP_SHARE * n))
    overlap = len(top_triggers(both["first"], k) & top_triggers(both["second"], k))
    return {"triggers": n, "rho": float(spearman_rho(x, y)),
            "rho_low": float(np.nanquantile(rhos, 0.025)),
            "rho_high": float(np.nanquantile(rhos, 0.975)),
            "top_k": k, "top_overlap": overlap, "chance_overlap": k * k / n,
            "top_overlap_p": overlap_p_value(overlap, k, n)}


def contrast_verdict(means: pd.DataFrame) -> pd.DataFrame:
    """Per rate of a protocols.mean_table by rate and method (ASR in %, 95% intervals):
    CONTRAST_MESA against the baseline, beside the ideal defence. finding: interval_finding's;
    gap_points: baseline mean minus MESA mean; both_above_ideal: both methods'
    intervals lie wholly above the ideal's (both leave backdoor that the true trigger removes)."""
    rows = []
    for rate, part in means.groupby("rate", sort=True):
        by = part.set_index("method")
        missing = {CONTRAST_MESA, "baseline", "ideal"} - set(by.index)
        if missing:
            raise ValueError(f"rate {rate:g}: the contrast needs rows for {sorted(missing)}")
        mesa, baseline, ideal = by.loc[CONTRAST_MESA], by.loc["baseline"], by.loc["ideal"]
        finding = interval_finding(mesa, baseline)
        rows.append({"rate": rate, "mesa": CONTRAST_MESA,
                     **{f"{name}_{column}": float(row[f"{column}_%"])
                        for name, row in (("mesa", mesa), ("baseline", baseline),
                                          ("ideal", ideal))
                        for column in ("mean", "low", "high")},
                     "gap_points": float(baseline["mean_%"] - mesa["mean_%"]),
                     "finding": finding,
                     "both_above_ideal": bool(min(mesa["low_%"], baseline["low_%"])
                                              > ideal["high_%"])})
    return pd.DataFrame(rows)


def run_differences(reference: pd.DataFrame, replicate: pd.DataFrame,
                    columns=("asr_before", "holdout_asr", "asr_after")) -> dict:
    """How far two screens of the same triggers (screen_rows tables; shares in [0, 1]) lie
    apart: per column, the mean and the largest |replicate - reference| in points over the
    triggers both hold (each trigger's mean over its rows), and that count as `triggers`."""
    a, b = (rows.groupby("trigger")[list(columns)].mean() for rows in (reference, replicate))
    shared = a.index.intersection(b.index)
    gap = (100 * (b.loc[shared] - a.loc[shared])).abs()
    return {"triggers": len(shared),
            **{f"{c}_{stat}_pts": float(getattr(gap[c], stat)()) for c in columns
               for stat in ("mean", "max")}}


def held_out_series(name: str, table: pd.DataFrame) -> dict:
    """{screen: held-out ASR per trigger (mean over its rows, in [0, 1])} of one set of screen
    units named `name`; the same-build set (rows with a `repeat` column) holds two screens:
    "rebuild" (repeat 0: the original screen again, on this build of the models) and
    "retraining" (repeat 1: the next baseline start and retraining seed on the same models)."""
    def by_trigger(rows):
        return rows.groupby("trigger").holdout_asr.mean()
    if "repeat" in table:
        return {"rebuild": by_trigger(table[table.repeat == 0]),
                "retraining": by_trigger(table[table.repeat == 1])}
    return {name: by_trigger(table)}


# Each replicate of the screen and the screen it is compared with, which differs from it in one
# thing. Training is not bitwise repeatable across machines, so a rebuild of the models from the
# same seeds is itself a replicate ("rebuild", against the committed original), and the
# retraining and attack-seed replicates are compared with the rebuild, whose models they share.
REPLICATES = {"retraining": "rebuild", "attack seed": "rebuild",
              "model and target": "original", "rebuild": "original"}
# The replicates that decide the verdict, each holding fixed less than the one before.
VERDICT_CHAIN = ("retraining", "attack seed", "model and target")


def hardness_verdict(agreement: pd.DataFrame) -> dict:
    """Which of noise, backdoored model, clean model or pattern a screen's ranking follows,
    from screen_agreement rows (column `screen`: a replicate of REPLICATES, against its
    reference). A replicate reproduces the ranking when its rho's 95% interval lies above 0,
    and its top when top_overlap_p < 0.05. follows: "noise" when the retraining replicate does
    not reproduce it (one retraining ranks its own draw); "backdoored model" when that one does
    but the attack-seed one does not; "clean model and target" when both do but the other
    model does not; "pattern" when all three do. Returns {follows, reproduced, top_reproduced}
    ({screen: bool}, every replicate present) and reading (what `follows` means, one
    sentence); follows is "undetermined" when one of VERDICT_CHAIN is missing."""
    rows = agreement.set_index("screen")
    reproduced = {s: bool(rows.loc[s, "rho_low"] > 0) for s in REPLICATES if s in rows.index}
    top = {s: bool(rows.loc[s, "top_overlap_p"] < 0.05) for s in REPLICATES if s in rows.index}
    if not set(VERDICT_CHAIN) <= set(reproduced):
        follows = "undetermined"
    elif not reproduced["retraining"]:
        follows = "noise"
    elif not reproduced["attack seed"]:
        follows = "backdoored model"
    elif not reproduced["model and target"]:
        follows = "clean model and target"
    else:
        follows = "pattern"
    return {"follows": follows, "reproduced": reproduced, "top_reproduced": top,
            "reading": VERDICT_READINGS[follows]}


VERDICT_READINGS = {
    "noise": "Retrained once more, the same backdoored models rank the triggers otherwise: one "
             "screen's hardest triggers are draws of the reversal and retraining, not a class "
             "of triggers.",
    "backdoored model": "The same models rank alike when retrained again, but the same pattern "
                        "attacked from another seed does not: hardness belongs to the "
                        "backdoored model, not to the pattern.",
    "clean model and target": "The ranking survives another attack seed but not another clean "
                              "model and target: hardness belongs to the pattern on this clean "
                              "model and target, not to the pattern alone.",
    "pattern": "Every replicate ranks the triggers alike: hardness belongs to the pattern.",
    "undetermined": "A replicate is missing, so no verdict.",
}


# ---------------------------------------------------------------------------------------------
# Healthy-run checks: what a sound run of each profile must reach

class UnhealthyRun(AssertionError):
    """A run finished but its numbers lie outside what a sound run of its profile reaches."""


def expect(cfg, what: str, value, at_least: dict | None = None, at_most: dict | None = None):
    """One healthy-run check: `value` must be finite and within the bounds given for
    cfg.profile ({profile: bound}; a profile without a bound only checks finiteness, e.g.
    `smoke`, whose tiny models reach nothing in particular). Returns a row for healthy_run."""
    low = (at_least or {}).get(cfg.profile)
    high = (at_most or {}).get(cfg.profile)
    value = float(value)
    ok = math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
    bounds = [f">= {low:g}"] if low is not None else []
    bounds += [f"<= {high:g}"] if high is not None else []
    return {"check": what, "value": value, "expected": " and ".join(bounds) or "finite",
            "ok": ok}


def healthy_run(rows: list) -> pd.DataFrame:
    """The table of `expect` rows; raises UnhealthyRun naming every failed check."""
    table = pd.DataFrame(rows)
    failed = table[~table.ok]
    if len(failed):
        lines = [f"{r.check}: {r.value:.4g}, expected {r.expected}" for r in failed.itertuples()]
        raise UnhealthyRun("this run is not healthy: " + "; ".join(lines))
    return table
