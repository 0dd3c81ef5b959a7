"""The paper's figures (and a few diagnostics) as matplotlib/seaborn figures.

Every function returns a Figure; outputs.NotebookOutputs writes it (PNG) where it belongs.
Triggers are tensors (N, 3, h, w) in [0, 1], drawn as small images ("thumbnails").
"""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from .analysis import thin
from .methods import CONTROLS, METHODS, method_label

matplotlib.rcParams["figure.max_open_warning"] = 0   # notebooks draw many figures



def _image(trigger) -> np.ndarray:
    """(h, w, 3) for imshow of a trigger (3, h, w), or of colour and transparency (4, h, w)
    blended over mid-grey (where it is transparent, the grey shows)."""
    trigger = torch.as_tensor(trigger).detach().float().cpu().clamp(0, 1)
    if len(trigger) == 4:
        trigger = trigger[3:] * trigger[:3] + (1 - trigger[3:]) * 0.5
    return trigger.permute(1, 2, 0).numpy()


def trigger_grid(triggers, titles, ncols=17, size=0.7):
    """All triggers in a grid, each titled (e.g. the 51 black-white triggers with their ids)."""
    n = len(triggers)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.25),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, trigger, title in zip(axes.flat, triggers, titles):
        ax.imshow(_image(trigger), interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(str(title), fontsize=8)
    return fig


def _thumbnail_ticks(ax, triggers, zoom=4.0):
    """Draw triggers under the x axis at ticks 0..len-1 (instead of tick labels)."""
    ax.set_xticks(range(len(triggers)))
    ax.set_xticklabels([])
    for x, trigger in enumerate(triggers):
        box = AnnotationBbox(OffsetImage(_image(trigger), zoom=zoom, interpolation="nearest"),
                             (x, 0), xybox=(0, -14), xycoords=("data", "axes fraction"),
                             boxcoords="offset points", frameon=False)
        ax.add_artist(box)


def attack_figure(df: pd.DataFrame, triggers):
    """Clean accuracy and ASR per backdoored model (rows of df: trigger, clean_accuracy, asr,
    clean_model_accuracy), triggers drawn on the axis."""
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(df) + 2), 3.2))
    x = np.arange(len(df))
    ax.bar(x - 0.2, 100 * df["asr"], 0.4, label="ASR", color="tab:red")
    ax.bar(x + 0.2, 100 * df["clean_accuracy"], 0.4, label="clean accuracy", color="tab:blue")
    ax.axhline(100 * df["clean_model_accuracy"].iloc[0], color="k", ls="--", lw=1,
               label="clean model")
    ax.set_ylabel("% on the 2K eval split")
    ax.set_ylim(0, 105)
    _thumbnail_ticks(ax, triggers)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def detection_heatmap(df: pd.DataFrame):
    """Average ASR (%) of each class's generated triggers: rows trigger, columns class."""
    table = df.pivot(index="trigger", columns="class", values="asr") * 100
    fig, ax = plt.subplots(figsize=(0.6 * table.shape[1] + 2, 0.45 * table.shape[0] + 1.2))
    sns.heatmap(table, annot=True, fmt=".0f", cmap="rocket_r", vmin=0, vmax=100, ax=ax,
                cbar_kws={"label": "ASR of sampled triggers (%)"})
    ax.set_xlabel("candidate target class")
    ax.set_ylabel("original trigger")
    return fig


def validity_heatmaps(validity: pd.DataFrame, panel: str = "seed"):
    """The validity matrix V (analysis.validity_table) as one heatmap per value of `panel`:
    rows the thresholds beta_i, columns the sub-models (alpha, beta), cells the share (%) of
    the column's samples with F > the row's threshold."""
    groups = list(validity.groupby(panel))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups) + 1, 3.2),
                             squeeze=False)
    for ax, (key, part) in zip(axes[0], groups):
        table = part.assign(sub_model=[f"a={a:g}\nb={b:g}" for a, b in zip(part.alpha,
                                                                            part.beta)])
        table = table.pivot_table(index="threshold", columns="sub_model", values="valid",
                                  sort=False) * 100
        sns.heatmap(table, annot=True, fmt=".0f", cmap="mako", vmin=0, vmax=100, ax=ax,
                    cbar=ax is axes[0, -1], cbar_kws={"label": "samples with F > threshold (%)"})
        ax.set_title(f"{panel} {key}", fontsize=9)
        ax.set_xlabel("sub-model (its samples)")
        ax.set_ylabel("threshold beta_i" if ax is axes[0, 0] else "")
        ax.tick_params(axis="x", labelsize=7, rotation=0)
    return fig


def distinct_curve_figure(curves: pd.DataFrame):
    """Distinct triggers against the number of samples n, one panel per radius, one line per
    alpha (mean over seeds, band min-max): curves has columns alpha, seed, n, radius,
    distinct (analysis.distinct_curve rows with alpha and seed)."""
    radii, sizes = sorted(curves.radius.unique()), sorted(curves.n.unique())
    data = curves.assign(alpha=[f"{a:g}" for a in curves.alpha])     # categories, not a scale
    fig, axes = plt.subplots(1, len(radii), figsize=(3.6 * len(radii), 3), squeeze=False)
    for ax, radius in zip(axes[0], radii):
        sns.lineplot(data=data[data.radius == radius], x="n", y="distinct", hue="alpha",
                     errorbar=("pi", 100), marker="o", palette="colorblind", ax=ax,
                     legend=ax is axes[0, -1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"radius {radius:g} (L2, 27 values)", fontsize=9)
        ax.set_xlabel("samples n")
        ax.set_ylabel("distinct triggers" if ax is axes[0, 0] else "")
    sns.move_legend(axes[0, -1], "center left", bbox_to_anchor=(1.02, 0.5), title="alpha")
    return fig


MESA_LOG_UNITS = {"hinge": "hinge term (target softmax units)",
                  "mi": "MINE estimate of I(G(z); z) (nats)",
                  "softmax": "mean target softmax F (0-1)"}


def mesa_log_figure(log: dict, labels):
    """Per-step hinge term, MI estimate and mean target softmax for each member of a bank."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, name in zip(axes, ("hinge", "mi", "softmax")):
        values = log[name].numpy()
        for i, label in enumerate(labels):
            ax.plot(values[:, i], label=str(label), lw=1)
        ax.set_title(name)
        ax.set_xlabel("generator step")
        ax.set_ylabel(MESA_LOG_UNITS[name])
    # Beside the plot: a bank can hold 15 members.
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def thumbnail_scatter(ax, points, triggers, bounds, min_fraction, zoom=2.5):
    """Each point drawn as its 3x3 trigger, skipping points closer than min_fraction of the
    bounds' diagonal to one already drawn. bounds: (n, 2) points that fix the axis limits
    (padded by 8%), e.g. all panels' points so that panels share axes. Omitting
    near-duplicates is what the paper's plots do."""
    low, high = bounds.min(0), bounds.max(0)
    pad = 0.08 * (high - low)
    ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
    for i in thin(points, min_fraction * float(np.linalg.norm(high - low))):
        ax.add_artist(AnnotationBbox(OffsetImage(_image(triggers[i]), zoom=zoom,
                                                 interpolation="nearest"),
                                     points[i], frameon=False, pad=0))


def embedding_panels(panels, min_fraction=0.04):
    """Fig. 3: one panel per setting, all on the same axes. panels: dicts with title,
    points (n, 2) and triggers (n, 3, h, w)."""
    all_points = np.concatenate([p["points"] for p in panels])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        thumbnail_scatter(ax, panel["points"], panel["triggers"], all_points, min_fraction)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("PC 1")
    axes[0, 0].set_ylabel("PC 2")
    return fig


def defense_figure(df: pd.DataFrame, triggers_by_id: dict):
    """Fig. 4: after-defence ASR per original trigger (sorted by the baseline's mean), every
    method as its mean over its runs (retraining seeds, or the baseline's starts) with a bar
    from its best to its worst run, the methods side by side within each trigger; the controls
    (methods.CONTROLS, which leave most of the backdoor) in a panel above on their own axis, so
    that the methods' axis separates the methods; the triggers drawn with their ids below.

    df: tidy rows of defense.compare_defenses (trigger, method, beta, asr_after).
    """
    labelled = df.assign(label=[method_label(m, b) for m, b in zip(df.method, df.beta)])
    order = (labelled[labelled.method == "baseline"].groupby("trigger")["asr_after"].mean()
             .sort_values().index.tolist()) or list(dict.fromkeys(df.trigger))
    betas = sorted(df[df.method == "mesa"]["beta"].dropna().unique())
    shades = dict(zip(betas, sns.color_palette("Blues", len(betas) + 1)[1:]))
    styles = {f"mesa beta={b:g}": (f"MESA beta={b:g}", shades[b], "o") for b in betas}
    styles.update({name: (m.label, m.colour, m.marker) for name, m in METHODS.items()
                   if name != "mesa"})
    present = [label for label in styles if (labelled.label == label).any()]
    panels = [[label for label in present if label in CONTROLS],
              [label for label in present if label not in CONTROLS]]
    panels = [labels for labels in panels if labels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(max(6, 1.1 * len(order) + 4), 1.6 + 2.6 * len(panels)),
                             gridspec_kw={"height_ratios": [1, 2.4][-len(panels):]})
    for ax, labels in zip(axes[:, 0], panels):
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            stats = (labelled[labelled.label == label].groupby("trigger")["asr_after"]
                     .agg(["mean", "min", "max"]).reindex(order).dropna())
            x = (np.array([order.index(t) for t in stats.index])
                 + (k - (len(labels) - 1) / 2) * width)
            name, colour, marker = styles[label]
            ax.errorbar(x, 100 * stats["mean"],
                        yerr=100 * np.stack([stats["mean"] - stats["min"],
                                             stats["max"] - stats["mean"]]),
                        fmt=marker, color=colour, capsize=2, ms=4, label=name)
        ax.set_ylabel("ASR after defence (%)\nmean, best to worst run"
                      if labels is panels[-1] else "ASR (%)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    bottom = axes[-1, 0]
    bottom.set_xlim(-0.5, len(order) - 0.5)
    _thumbnail_ticks(bottom, [triggers_by_id[t] for t in order])
    for x, trigger in enumerate(order):
        bottom.annotate(str(trigger), (x, 0), xytext=(0, -30), xycoords=("data", "axes fraction"),
                        textcoords="offset points", ha="center", va="top", fontsize=8)
    bottom.set_xlabel("original trigger (id), sorted by the baseline's mean", labelpad=34)
    return fig


def tsne_figure(panels, min_fraction=0.03):
    """Fig. 5: per original trigger, its reversed distribution (t-SNE points drawn as
    triggers) with the original and a baseline trigger beside it. panels: dicts with title,
    points (n, 2), triggers (n, 3, h, w), original (3, h, w), baseline (3, h, w)."""
    fig = plt.figure(figsize=(4.2 * len(panels), 3.6))
    grid = fig.add_gridspec(2, 2 * len(panels), width_ratios=[1, 4] * len(panels))
    for j, panel in enumerate(panels):
        for row, (name, trigger) in enumerate((("original", panel["original"]),
                                               ("baseline", panel["baseline"]))):
            ax = fig.add_subplot(grid[row, 2 * j])
            ax.imshow(_image(trigger), interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        ax = fig.add_subplot(grid[:, 2 * j + 1])
        thumbnail_scatter(ax, panel["points"], panel["triggers"], panel["points"], min_fraction)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig



def original_vs_distribution(points, triggers, original_point, original, title):
    """Fig. 1(b): the valid trigger distribution (PCA points drawn as triggers) with the
    original trigger marked where it falls in the same plane."""
    fig, (ax_original, ax) = plt.subplots(1, 2, figsize=(6.5, 3.4),
                                          gridspec_kw={"width_ratios": [1, 4]})
    ax_original.imshow(_image(original), interpolation="nearest", vmin=0, vmax=1)
    ax_original.set_title("original", fontsize=9)
    ax_original.axis("off")
    thumbnail_scatter(ax, points, triggers, np.concatenate([points, original_point[None]]), 0.04)
    ax.plot(*original_point, marker="*", ms=16, color="tab:red", mec="k", ls="none",
            label="original trigger")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return fig


def purification_figure(rows: list, titles: list):
    """SampDetox step by step, one row per image: the input, stage 1's reconstruction, the
    SSIM map of the two, stage 2's noise levels and the purified image. rows: dicts of
    "input", "stage1", "output" (3, H, W) in [0, 1], "ssim" (H, W) in [-1, 1] and "levels"
    (H, W) ints in [0, t2]; titles: one per row."""
    columns = ("input", "stage 1", "SSIM(input, stage 1)", "stage 2 noise level", "purified")
    fig, axes = plt.subplots(len(rows), 5, figsize=(8.5, 1.8 * len(rows)), squeeze=False)
    top = max(int(row["levels"].max()) for row in rows) or 1
    # SSIM from the lowest value shown up to 1: the whole [-1, 1] scale would show pale squares
    lowest = min(float(row["ssim"].min()) for row in rows)
    for r, (row, title) in enumerate(zip(rows, titles)):
        panels = (_image(row["input"]), _image(row["stage1"]), row["ssim"].cpu().numpy(),
                  row["levels"].cpu().numpy(), _image(row["output"]))
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            if c == 2:
                shown = ax.imshow(panel, cmap="magma", vmin=min(lowest, 0.99), vmax=1)
            elif c == 3:
                shown = ax.imshow(panel, cmap="viridis", vmin=0, vmax=top)
            else:
                ax.imshow(panel, interpolation="nearest")
            if c in (2, 3) and r == len(rows) - 1:
                fig.colorbar(shown, ax=axes[:, c], shrink=0.6, location="bottom", pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r, 0].set_ylabel(title, fontsize=8)
    return fig


def loss_curve(history: list, x: str, y: str, title: str):
    """A training curve from per-interval rows (dicts with keys x and y)."""
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.plot([h[x] for h in history], [h[y] for h in history], marker="o", ms=3)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    return fig


def defence_metric_figure(table: pd.DataFrame):
    """CA, PA and ASR (%) with their 95% intervals per model (rows of table: model, stage,
    and ca/pa/asr with _low/_high), one panel per measure, stages side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3), sharey=True)
    stages = list(dict.fromkeys(table.stage))
    models = list(dict.fromkeys(table.model))
    width = 0.8 / len(stages)
    for ax, metric in zip(axes, ("ca", "pa", "asr")):
        for i, stage in enumerate(stages):
            part = table[table.stage == stage].set_index("model").loc[models]
            x = np.arange(len(models)) + (i - (len(stages) - 1) / 2) * width
            errors = [100 * (part[metric] - part[f"{metric}_low"]),
                      100 * (part[f"{metric}_high"] - part[metric])]
            ax.bar(x, 100 * part[metric], width, yerr=errors, capsize=2, label=stage)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_title(metric.upper(), fontsize=10)
        ax.set_xlabel("backdoored model (trigger)")
    axes[0].set_ylabel("% (95% interval)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


# ---------------------------------------------------------------------------------------------
# Notebook 07: the claim under other protocols

BREADTH_ORDER = ("original", "rotation/flip", "inverted", "inverted + rotation/flip",
                 "other trigger", "random 3x3")


def breadth_figure(table: pd.DataFrame):
    """ASR (%) of every probe of protocols.breadth_rows on each backdoored model: one point per
    probe, grouped by kind (original, its symmetry variants, the other triggers, random 3x3
    patches), one colour per backdoored model."""
    order = [kind for kind in BREADTH_ORDER if (table.probe == kind).any()]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    sns.stripplot(data=table.assign(asr_pct=100 * table.asr, model=table.trigger.astype(str)),
                  x="probe", y="asr_pct", hue="model", order=order, dodge=True, jitter=0.25,
                  size=4, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("ASR on the backdoored model (%)")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(title="backdoor of trigger", fontsize=7, title_fontsize=7)
    return fig


def attack_map_figure(table: pd.DataFrame):
    """The attack map: ASR (%) over poison rate x learning rate, one panel per number of
    epochs, each cell also giving the clean-accuracy drop in points; cells that plant a
    backdoor (protocols.PLANTED_ASR at most PLANTED_MAX_DROP_PTS drop) are boxed."""
    epochs = sorted(table.epochs.unique())
    fig, axes = plt.subplots(1, len(epochs), figsize=(4.2 * len(epochs), 3.4), squeeze=False)
    for ax, e in zip(axes[0], epochs):
        part = table[table.epochs == e]
        asr = part.pivot(index="poison_rate", columns="lr", values="asr").mul(100)
        drop = part.pivot(index="poison_rate", columns="lr", values="accuracy_drop_pts")
        plants = part.pivot(index="poison_rate", columns="lr", values="plants")
        text = asr.round(1).astype(str) + "%\n" + drop.map(lambda d: f"{-d:+.1f} pts")
        sns.heatmap(asr, annot=text, fmt="", vmin=0, vmax=100, cmap="Reds", ax=ax,
                    cbar=ax is axes[0][-1], annot_kws={"fontsize": 7})
        for i, rate in enumerate(asr.index):
            for j, lr in enumerate(asr.columns):
                if plants.loc[rate, lr]:
                    ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, lw=2, ec="black"))
        ax.set_title(f"{e} epoch{'s' if e > 1 else ''}: ASR and clean-accuracy change",
                     fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("poison rate")
    return fig


def exposure_figure(table: pd.DataFrame):
    """After-defence ASR (%) against the retraining rate r: per method its mean over the
    triggers and runs, with a bar from its best to its worst run (protocols.exposure_rows)."""
    labelled = table.assign(label=[method_label(m, b) for m, b in zip(table.method, table.beta)])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label in dict.fromkeys(labelled.label):
        method = labelled[labelled.label == label].method.iloc[0]
        name, colour, marker = (METHODS[method].label, METHODS[method].colour,
                                METHODS[method].marker)
        name = label.replace("mesa beta=", "MESA beta=") if method == "mesa" else name
        stats = (labelled[labelled.label == label].groupby("rate").asr_after
                 .agg(["mean", "min", "max"]).sort_index())
        ax.errorbar(100 * stats.index, 100 * stats["mean"],
                    yerr=100 * np.stack([stats["mean"] - stats["min"],
                                         stats["max"] - stats["mean"]]),
                    fmt=marker + "-", color=colour, capsize=2, ms=4, lw=1, label=name)
    ax.set_xscale("log")
    rates = sorted(table.rate.unique())
    ax.set_xticks([100 * r for r in rates], [f"{100 * r:g}" for r in rates])
    ax.set_xlabel("retraining rate r (% of images triggered)")
    ax.set_ylabel("ASR after defence (%)\nmean, best to worst run")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def baseline_variants_figure(table: pd.DataFrame):
    """After-defence ASR (%) of the baseline three ways (protocols.baseline_variant_rows):
    one point per start, one colour per trigger."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.stripplot(data=table.assign(asr_pct=100 * table.asr_after,
                                    model=table.trigger.astype(str)),
                  x="variant", y="asr_pct", hue="model", dodge=True, size=5, ax=ax)
    ax.set_xlabel("how the single trigger was reversed")
    ax.set_ylabel("ASR after defence (%)")
    ax.legend(title="trigger", fontsize=7, title_fontsize=7)
    return fig


SCREEN_PROXIES = {   # column of a screen row -> what it measures, before any retraining
    "inverted_asr": "ASR of the inverted trigger (%)",
    "symmetry_max_asr": "highest ASR of a rotation, flip\nor inversion of the trigger (%)",
    "random_patch_asr": "ASR of random 3x3 patches (%)",
    "reversed_asr": "ASR of the reversed trigger\n(held-out images, %)",
}


def screen_figure(table: pd.DataFrame, triggers_by_id: dict):
    """The hard-trigger screen: per trigger (sorted, hardest on the right) the ASR left by the
    single reversed trigger's retraining on the held-out images and on the eval split (mean
    over the screened starts), with the ASR before the defence; thumbnails name the triggers."""
    per_trigger = (table.groupby("trigger")[["holdout_asr", "asr_after", "asr_before"]].mean()
                   .sort_values("holdout_asr"))
    x = np.arange(len(per_trigger))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(x) + 2), 3.6))
    ax.plot(x, 100 * per_trigger.holdout_asr, "s", color="tab:red", ms=4,
            label="after: held-out images (ranks)")
    ax.plot(x, 100 * per_trigger.asr_after, "o", mfc="none", color="tab:red", ms=5,
            label="after: eval split (reports)")
    ax.plot(x, 100 * per_trigger.asr_before, "_", color="black", ms=8, label="before the defence")
    ax.set_ylabel("ASR of the original trigger (%)")
    ax.set_xlim(-0.5, len(x) - 0.5)
    _thumbnail_ticks(ax, [triggers_by_id[t] for t in per_trigger.index], zoom=2.5)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def screen_proxy_figure(table: pd.DataFrame):
    """Each cheap measure of SCREEN_PROXIES (x) against the held-out ASR the single reversed
    trigger's retraining left (y), one point per trigger and start; -1 (no such probe) left
    out."""
    fig, axes = plt.subplots(1, len(SCREEN_PROXIES), figsize=(3.2 * len(SCREEN_PROXIES), 3),
                             sharey=True)
    for ax, (column, label) in zip(axes, SCREEN_PROXIES.items()):
        part = table[table[column] >= 0]
        ax.scatter(100 * part[column], 100 * part.holdout_asr, s=12, color="tab:red")
        ax.set_xlabel(label, fontsize=8)
    axes[0].set_ylabel("ASR after the baseline's\nretraining (held-out, %)")
    return fig


def screen_replication_figure(pairs: dict, agreement: pd.DataFrame):
    """Each replicate of the screen against its reference: one panel per replicate ({screen:
    table with columns reference, replicate (held-out ASR after one retraining, in [0, 1]),
    indexed by trigger}), one point per trigger, the diagonal where the two would agree, and
    the agreement row's reference (`against`), rho (95% interval) and top-k overlap."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.7), squeeze=False)
    rows = agreement.set_index("screen")
    for ax, (screen, table) in zip(axes[0], pairs.items()):
        high = max(105 * max(table.reference.max(), table.replicate.max()), 1.0)  # 0: no box
        ax.plot([0, high], [0, high], color="lightgray", lw=1, zorder=0)
        ax.scatter(100 * table.reference, 100 * table.replicate, s=14, color="tab:red")
        for trigger, row in table.iterrows():
            ax.annotate(str(trigger), (100 * row.reference, 100 * row.replicate), fontsize=5,
                        xytext=(2, 2), textcoords="offset points", color="dimgray")
        r = rows.loc[screen]
        ax.set_title(f"{screen} vs {r.against}: rho {r.rho:+.2f} [{r.rho_low:+.2f}, "
                     f"{r.rho_high:+.2f}]\n{r.triggers} triggers; top {r.top_k}: "
                     f"{r.top_overlap} shared (chance {r.chance_overlap:.1f})", fontsize=8)
        ax.set_xlabel(f"{r.against} screen: held-out ASR\nafter one retraining (%)", fontsize=8)
        ax.set_ylabel(f"{screen} screen: held-out ASR\nafter one retraining (%)", fontsize=8)
        ax.set_xlim(0, high)
        ax.set_ylim(0, high)
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def size_free_samples_figure(samples, titles, size=1.0):
    """Size-free triggers (n, 4, S, S) in [0, 1], colour and transparency: per sample its
    colour blended over mid-grey by its transparency (top row, _image) and the transparency
    alone (bottom row, white = opaque)."""
    samples = torch.as_tensor(samples).detach().float().cpu()
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(n * size, 2.3 * size), squeeze=False)
    for k, (sample, title) in enumerate(zip(samples, titles)):
        axes[0, k].imshow(_image(sample), interpolation="nearest")
        axes[1, k].imshow(sample[3].numpy(), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[0, k].set_title(str(title), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("blended\non grey", fontsize=7)
    axes[1, 0].set_ylabel("transparency", fontsize=7)
    return fig


def unknown_size_figure(summary: pd.DataFrame):
    """09's comparison: per trigger shape (x) and method, the mean after-defence ASR (%) with
    its 95% bootstrap interval over the runs (unknown_size.summary_table)."""
    shapes = list(dict.fromkeys(summary.trigger_size))
    methods = list(dict.fromkeys(summary.method))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(shapes) + 3), 3.8))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        part = summary[summary.method == method].set_index("trigger_size").reindex(shapes)
        x = np.arange(len(shapes)) + (k - (len(methods) - 1) / 2) * width
        style = METHODS[method]
        ax.errorbar(x, part["mean_%"], yerr=np.stack([part["mean_%"] - part["low_%"],
                                                      part["high_%"] - part["mean_%"]]),
                    fmt=style.marker, color=style.colour, capsize=2, ms=5, label=style.label)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_xlabel("trigger shape")
    ax.set_ylabel("ASR after defence (%)\nmean, 95% interval")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig
