"""Measures, tables and healthy-run checks on cases whose answer is known."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mesa_utils.analysis import (UnhealthyRun, coverage, detection_summary, distinct_triggers,
                                 expect, healthy_run, hyperparameter_claims, nesting_pairs,
                                 nesting_table, pca_2d, summarize, thin)
from mesa_utils.config import make_config
from mesa_utils.mesa import study_members


def test_coverage_detects_nesting():
    torch.manual_seed(0)
    wide, narrow = torch.rand(800, 2), 0.25 + 0.5 * torch.rand(400, 2)
    assert coverage(narrow, wide) > 0.9 > 0.6 > coverage(wide, narrow)


def test_thin_drops_near_duplicates():
    points = np.array([[0, 0], [0.001, 0], [1, 1], [1, 1.001], [2, 0]])
    assert thin(points, 0.1).tolist() == [0, 2, 4]


def test_distinct_triggers_counts_clusters_not_samples():
    torch.manual_seed(0)
    centres = torch.rand(3, 3, 3, 3)
    clustered = centres[torch.randint(3, (500,))] + 0.01 * torch.randn(500, 3, 3, 3)
    assert distinct_triggers(clustered) == 3
    assert distinct_triggers(torch.rand(500, 3, 3, 3)) > 400




@pytest.mark.parametrize("seeds_agree", [True, False])
def test_nesting_table_and_claims_on_sets_that_nest(seeds_agree):
    cfg = make_config("smoke")
    members = study_members(cfg)
    torch.manual_seed(0)
    # Every member samples a square whose side shrinks as beta grows (nested), centred at the
    # origin, or, when seeds disagree, at a different place for every seed.
    samples = {m: (0.05 + 1.0 - m.beta) * (torch.rand(400, 2) - 0.5)
               + (0 if seeds_agree else 5 * m.seed) for m in members}
    pairs = nesting_pairs(cfg, members)
    assert [kind for kind, _, _ in pairs].count("staircase") == 3 * (len(cfg.mesa.betas) - 1)
    for kind, inner, outer in pairs:
        assert inner.beta >= outer.beta
        assert (inner.seed == outer.seed) == (kind == "staircase")
    nesting = nesting_table(pairs, samples, {m: x.numpy() for m, x in samples.items()})
    staircase = nesting[nesting.comparison == "staircase"]
    assert (staircase.inner_in_outer > 0.9).all() and (staircase.outer_in_inner < 0.7).all()
    assert np.allclose(nesting.inner_in_outer, nesting.inner_in_outer_2d)   # already 2-D
    # alpha 0 with 5 distinct triggers and alpha 0.1 with 40 in every seed; alpha 10 empty.
    settings = pd.DataFrame([{"seed": m.seed, "alpha": m.alpha, "beta": m.beta,
                              "distinct": {0.0: 5, 10.0: 300}.get(m.alpha, 40),
                              "asr": 0.3 if m.alpha == 10 else 0.95} for m in members])
    claims = hyperparameter_claims(cfg, settings, nesting).set_index("claim")
    seed_claim = claims.index.str.startswith("one setting from two seeds")
    assert claims.cases.tolist() == [3, 3, 3, 6, 6, 3]   # seeds, seeds x beta pairs, seed pairs
    assert (claims[~seed_claim].holds == claims[~seed_claim].cases).all()
    assert claims[seed_claim].holds.item() == (3 if seeds_agree else 0)


def test_pca_2d_shares_axes_and_reports_the_kept_variance():
    torch.manual_seed(0)
    flat = torch.zeros(300, 6)
    flat[:, :2] = torch.randn(300, 2)                 # all variance in a plane ...
    shifted = flat + torch.tensor([3.0, 0, 0, 0, 0, 0])
    (a, b), explained = pca_2d([flat, shifted])
    assert explained > 0.999                          # ... which the two components keep
    assert np.allclose(np.linalg.norm(b - a, axis=1), 3.0, atol=1e-4)   # one shared frame
    _, explained = pca_2d([torch.randn(2000, 10)])
    assert explained < 0.3                            # isotropic: 2 of 10 dimensions


def test_detection_summary_reports_margin_and_correctness():
    rows = [{"trigger": t, "class": c, "asr": asr, "flagged": asr > 0.5}
            for t, asrs in ((170, [0.95, 0.05, 0.02]), (15, [0.9, 0.7, 0.1]))
            for c, asr in enumerate(asrs)]
    table = detection_summary(pd.DataFrame(rows), target=0).set_index("trigger")
    assert table.loc[170, "correct"] and not table.loc[15, "correct"]
    assert table.loc[15, "flagged_classes"] == [0, 1]
    assert abs(table.loc[170, "margin"] - 0.90) < 1e-9


def test_summary_lists_every_method_beside_the_paper():
    rows = []
    for trigger in (170, 15):
        for method, beta, start in [("mesa", 0.5, None), ("mesa", 0.9, None),
                                    ("mesa_mixture", None, None), ("baseline", None, 0),
                                    ("baseline", None, 1), ("neural_cleanse", None, None),
                                    ("ideal", None, None)]:
            rows.append({"trigger": trigger, "method": method, "beta": beta, "start": start,
                         "asr_before": 0.99, "asr_after": 0.05 if start != 1 else 0.4,
                         "clean_before": 0.8, "clean_after": 0.79})
    table = summarize(pd.DataFrame(rows))
    assert table.method.tolist() == ["before defence", "mesa beta=0.5", "mesa beta=0.9",
                                     "mesa_mixture", "baseline", "neural_cleanse", "ideal"]
    baseline = table.set_index("method").loc["baseline"]
    assert baseline["worst_asr_%"] == 40 and baseline["runs"] == 4
    assert table.set_index("method").loc["mesa beta=0.9", "paper"] == "mean 3.4%, worst 5.9%"
    assert abs(baseline["clean_change_pts"] + 1) < 1e-6
    # runs 5, 40, 5, 40 (%): the bootstrap interval of the mean lies inside [5, 40] around 22.5
    assert baseline["mean_asr_%"] == 22.5
    assert 5 <= baseline["mean_asr_low_%"] < 22.5 < baseline["mean_asr_high_%"] <= 40
    ideal = table.set_index("method").loc["ideal"]     # identical runs: no spread
    assert ideal["mean_asr_low_%"] == ideal["mean_asr_high_%"] == 5


def test_healthy_run_applies_the_profile_bounds_and_names_every_failure():
    quick, smoke = make_config("quick"), make_config("smoke")
    bound = {"quick": 0.9, "paper": 0.9}
    assert expect(quick, "ASR", 0.95, at_least=bound)["ok"]
    assert not expect(quick, "ASR", 0.85, at_least=bound)["ok"]
    assert expect(smoke, "ASR", 0.05, at_least=bound)["ok"]          # smoke: finite only
    assert not expect(smoke, "ASR", math.nan, at_least=bound)["ok"]   # ... but always finite
    assert not expect(quick, "drop", 2.5, at_most={"quick": 2.0})["ok"]
    table = healthy_run([expect(quick, "ASR", 0.95, at_least=bound)])
    assert table.expected.tolist() == [">= 0.9"]
    with pytest.raises(UnhealthyRun, match=r"ASR: 0.85, expected >= 0.9; drop: 2.5, "
                                           r"expected <= 2"):
        healthy_run([expect(quick, "ASR", 0.85, at_least=bound),
                     expect(quick, "drop", 2.5, at_most={"quick": 2.0}),
                     expect(quick, "fine", 1.0)])
