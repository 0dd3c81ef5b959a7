"""Measures, tables and checks computed on the stages' results (the method is in mesa.py and
defense.py): spread and distinct triggers of sample sets, coverage of one set by another,
2-D embeddings, the Fig. 3 claims, the detection and defence summaries beside the paper's
numbers, and each notebook's healthy-run check.

Sample sets are tensors (n, ...) of triggers in [0, 1]; tables are pandas DataFrames.
"""
import itertools
import math

import numpy as np
import pandas as pd
import torch

from .intervals import bootstrap_interval


# ---------------------------------------------------------------------------------------------
# Sample sets: spread, distinct triggers, coverage, embeddings

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


# ---------------------------------------------------------------------------------------------
# Fig. 3: the staircase comparisons and the paper's claims (notebook 03)

def nesting_pairs(cfg, members) -> list:
    """(comparison, inner, outer) Members of a study bank to compare: per seed, each beta of
    mesa.betas inside the next lower one ("staircase"); and the reference setting
    (mesa.alpha at study.beta) of a later seed inside an earlier one's ("same setting, other
    seed": identical valid sets, the yardstick)."""
    alpha, betas = cfg.mesa.alpha, sorted(cfg.mesa.betas)
    seeds = sorted({m.seed for m in members})

    def member(beta, seed):
        return next(m for m in members if (m.alpha, m.beta, m.seed) == (alpha, beta, seed))

    pairs = [("staircase", member(high, s), member(low, s))
             for s in seeds for low, high in zip(betas, betas[1:])]
    pairs += [("same setting, other seed", member(cfg.study.beta, t), member(cfg.study.beta, s))
              for s, t in itertools.combinations(seeds, 2)]
    return pairs


def nesting_table(pairs, samples: dict, planes: dict):
    """DataFrame of `coverage` both ways for each (comparison, inner, outer) of `pairs`: in the
    samples' own space (samples: {Member: (n, ...) tensor}) and, columns *_2d, in the 2-D
    planes ({Member: (n, 2) array}, e.g. pca_2d's: what the eye judges in Fig. 3)."""
    planes = {m: torch.as_tensor(p) for m, p in planes.items()}
    return pd.DataFrame([{"comparison": kind, "inner": inner.label(), "outer": outer.label(),
                          "inner_in_outer": coverage(samples[inner], samples[outer]),
                          "outer_in_inner": coverage(samples[outer], samples[inner]),
                          "inner_in_outer_2d": coverage(planes[inner], planes[outer]),
                          "outer_in_inner_2d": coverage(planes[outer], planes[inner])}
                         for kind, inner, outer in pairs])


def hyperparameter_claims(cfg, settings, nesting):
    """The paper's Fig. 3 claims checked on one run: DataFrame (claim, holds, cases), holds
    counting the seeds (or pairs) where the claim is true. settings: rows with seed, alpha,
    beta, asr and distinct (distinct_triggers); nesting: a nesting_table."""
    by_seed = settings.set_index(["seed", "alpha", "beta"])

    def column(name, alpha):   # per seed, at beta = study.beta
        return by_seed[name].xs((alpha, cfg.study.beta), level=["alpha", "beta"]).to_numpy()

    low, ref, high = min(cfg.study.alphas), cfg.mesa.alpha, max(cfg.study.alphas)
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
