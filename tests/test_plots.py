"""Every figure function draws and writes a PNG."""
import numpy as np
import pandas as pd
import pytest
import torch

from mesa_utils import plots
from mesa_utils.methods import METHODS
from mesa_utils.config import make_config
from mesa_utils.outputs import NotebookOutputs


@pytest.fixture
def outputs(tmp_path):
    return NotebookOutputs(make_config("smoke"), "99", root=tmp_path)


def _written(fig, name, outputs):
    outputs.figure(fig, name)
    path = outputs.staging / f"99_{name}.png"
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_figures_are_written(outputs):
    triggers = torch.rand(6, 3, 3, 3)
    _written(plots.trigger_grid(triggers, range(6), ncols=3), "grid", outputs)
    attack = pd.DataFrame({"trigger": [1, 2], "asr": [0.9, 0.95], "clean_accuracy": [0.8, 0.8],
                           "clean_model_accuracy": [0.81, 0.81]})
    _written(plots.attack_figure(attack, triggers[:2]), "attack", outputs)
    detection = pd.DataFrame({"trigger": [1] * 3 + [2] * 3, "class": [0, 1, 2] * 2,
                              "asr": np.linspace(0, 1, 6)})
    _written(plots.detection_heatmap(detection), "heatmap", outputs)
    log = {name: torch.rand(10, 2) for name in ("hinge", "mi", "softmax")}
    _written(plots.mesa_log_figure(log, ["a", "b"]), "log", outputs)
    panels = [{"title": f"p{i}", "points": np.random.rand(6, 2), "triggers": triggers,
               "original": triggers[0], "baseline": triggers[1]} for i in range(2)]
    _written(plots.embedding_panels(panels), "pca", outputs)
    _written(plots.tsne_figure(panels), "tsne", outputs)
    _written(plots.original_vs_distribution(np.random.rand(6, 2), triggers, np.zeros(2),
                                            triggers[0], "t"), "fig1b", outputs)
    runs = pd.DataFrame([{"trigger": t, "method": m, "beta": b, "start": s, "asr_after": a}
                         for t in (1, 2)
                         for m, b, s, a in [("mesa", 0.9, None, 0.03),
                                            ("baseline", None, 0, 0.1),
                                            ("baseline", None, 1, 0.3 * t), ("ideal", None, None, 0.02),
                                            ("mesa_mixture", None, None, 0.04)]])
    _written(plots.defense_figure(runs, {1: triggers[0], 2: triggers[1]}), "fig4", outputs)
    validity = pd.DataFrame([{"seed": s, "alpha": 0.1, "beta": b, "threshold": t,
                              "valid": float(t <= b)} for s in (0, 1) for b in (0.5, 0.9)
                             for t in (0.5, 0.9)])
    _written(plots.validity_heatmaps(validity), "validity", outputs)
    curves = pd.DataFrame([{"alpha": a, "seed": s, "n": n, "radius": r, "distinct": n // (1 + a)}
                           for a in (0, 10) for s in (0, 1) for n in (10, 100)
                           for r in (0.5, 1.0)])
    _written(plots.distinct_curve_figure(curves), "distinct", outputs)
    path = outputs.table(runs, "runs")
    assert pd.read_csv(path).shape == runs.shape


def test_fig4_draws_the_controls_apart_and_names_the_triggers(outputs):
    runs = pd.DataFrame([{"trigger": t, "method": m, "beta": b, "asr_after": a}
                         for t in (7, 9)
                         for m, b, a in [("mesa", 0.9, 0.03), ("baseline", None, 0.1 * t),
                                         ("ideal", None, 0.02), ("finetune", None, 0.95),
                                         ("random_patch", None, 0.8)]])
    fig = plots.defense_figure(runs, {7: torch.zeros(3, 3, 3), 9: torch.ones(3, 3, 3)})
    controls, methods = fig.axes
    assert [t.get_text() for t in controls.get_legend().get_texts()] == [
        METHODS["finetune"].label, METHODS["random_patch"].label]
    assert methods.get_ylim()[1] < 100          # the methods' axis is not squeezed by 95%
    assert controls.get_ylim()[1] > 95
    assert all(ax.get_ylabel() for ax in fig.axes) and "trigger" in methods.get_xlabel()
    assert {t.get_text() for t in methods.texts} == {"7", "9"}   # ids, baseline order 7, 9
    _written(fig, "fig4_controls", outputs)


def test_the_training_curves_name_their_units(outputs):
    log = {name: torch.rand(10, 2) for name in ("hinge", "mi", "softmax")}
    fig = plots.mesa_log_figure(log, ["a", "b"])
    assert [ax.get_ylabel() for ax in fig.axes] == list(plots.MESA_LOG_UNITS.values())


def test_the_screen_replication_figure_has_one_labelled_panel_per_replicate(outputs):
    from mesa_utils.analysis import screen_agreement
    rng = np.random.default_rng(0)
    reference = pd.Series(rng.random(8), index=range(8))
    replicates = {"retraining": reference + 0.05 * rng.random(8),
                  "attack seed": pd.Series(np.zeros(8))}        # all 0: still a square box
    pairs = {name: pd.concat({"reference": reference, "replicate": values}, axis=1)
             for name, values in replicates.items()}
    agreement = pd.DataFrame([{"screen": "retraining", "against": "rebuild",
                               **screen_agreement(reference, replicates["retraining"])},
                              {"screen": "attack seed", "against": "rebuild", "triggers": 8,
                               "rho": np.nan, "rho_low": np.nan, "rho_high": np.nan,
                               "top_k": 2, "top_overlap": 0, "chance_overlap": 0.5}])
    fig = plots.screen_replication_figure(pairs, agreement)
    axes = fig.axes
    assert len(axes) == 2 and all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    assert axes[0].get_title().startswith("retraining vs rebuild: rho +")
    assert axes[0].get_xlabel().startswith("rebuild screen") and axes[1].get_ylim()[1] >= 1
    _written(fig, "replication", outputs)
