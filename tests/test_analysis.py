"""Measures, tables and healthy-run checks on cases whose answer is known."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mesa_utils.analysis import (ENTROPY_RESOLUTION, UnhealthyRun, defense_conclusions,
                                 detection_summary, distinct_curve, distinct_triggers, expect,
                                 healthy_run, hyperparameter_claims, hyperparameter_findings,
                                 knn_entropy, manifold_share, overlap_pairs, overlap_table,
                                 pca_2d, summarize, thin, validity_table)
from mesa_utils.config import make_config
from mesa_utils.mesa import study_members


def test_manifold_share_on_sets_with_known_answers():
    torch.manual_seed(0)
    draw = lambda n: torch.rand(n, 2)                                  # noqa: E731
    a, b = draw(1000), draw(1000)
    # identical distributions: near 1 both ways (two draws of one generator)
    assert manifold_share(a, b) > 0.9 and manifold_share(b, a) > 0.9
    # nested: a square of a quarter of the area inside: ~1 one way, ~1/4 the other
    narrow = 0.25 + 0.5 * torch.rand(1000, 2)
    assert manifold_share(narrow, a) > 0.95
    assert 0.2 < manifold_share(a, narrow) < 0.35
    # disjoint: 0 both ways
    assert manifold_share(a + 5, b) == 0 and manifold_share(b, a + 5) == 0
    # two modes against one of them: the one-mode set is fully inside, covers half
    one_mode = draw(1000)
    two_modes = torch.cat([draw(500), draw(500) + 5])
    assert manifold_share(one_mode, two_modes) > 0.9
    assert 0.45 < manifold_share(two_modes, one_mode) < 0.55
    # in the triggers' 27 dimensions identity scores lower (distances concentrate), which is
    # why every comparison is read beside a second draw of the same generator
    identical = manifold_share(torch.randn(1000, 27), torch.randn(1000, 27))
    assert 0.6 < identical < 0.85
    assert manifold_share(torch.randn(1000, 27) + 3, torch.randn(1000, 27)) < 0.05


def test_knn_entropy_on_distributions_with_known_entropy():
    torch.manual_seed(0)
    # uniform on the unit cube: 0 nats, up to the estimator's known bias at the boundary
    # (neighbours are missing beyond the faces, so distances there run long): +0.10 at n=3000
    assert abs(knn_entropy(torch.rand(3000, 3))) < 0.15
    # Gaussian, std 0.1 in 2-D: log(2 pi e) + 2 log(0.1) = -1.767 nats
    sigma, d = 0.1, 2
    truth = 0.5 * d * math.log(2 * math.pi * math.e * sigma ** 2)
    assert abs(knn_entropy(sigma * torch.randn(3000, d)) - truth) < 0.1
    # it converges with n instead of growing: a fourth of the samples gives nearly as much
    cube = torch.rand(4000, 3)
    assert abs(knn_entropy(cube[:1000]) - knn_entropy(cube)) < 0.15
    # repeated points: the finite floor at the resolution, far below any spread set
    repeated = torch.rand(3, 27)[torch.arange(300) % 3]
    floor = knn_entropy(repeated)
    assert math.isfinite(floor) and floor < 27 * math.log(ENTROPY_RESOLUTION) + 50
    assert floor < knn_entropy(torch.rand(300, 27)) - 100


def test_distinct_curve_saturates_for_a_collapsed_set_and_grows_for_a_spread_one():
    torch.manual_seed(0)
    centres = torch.rand(3, 27)
    collapsed = centres[torch.randint(3, (800,))] + 0.01 * torch.randn(800, 27)
    curve = distinct_curve(collapsed, sizes=(100, 400, 800), radii=(0.5, 1.0))
    assert (curve.distinct == 3).all() and len(curve) == 6
    spread_out = distinct_curve(torch.rand(800, 27), sizes=(100, 400, 800), radii=(0.5,))
    assert spread_out.distinct.is_monotonic_increasing and spread_out.distinct.iloc[-1] > 400


def test_validity_table_counts_samples_above_each_threshold():
    from mesa_utils.mesa import Member
    low, high = Member(0.5, 0.1, 0), Member(0.9, 0.1, 0)
    softmax = {low: torch.tensor([0.4, 0.6, 0.85, 0.95]), high: torch.tensor([0.95, 0.99])}
    table = validity_table(softmax, [0.9, 0.5]).set_index(["beta", "threshold"]).valid
    assert table[(0.5, 0.5)] == 0.75 and table[(0.5, 0.9)] == 0.25     # precision, band
    assert table[(0.9, 0.9)] == 1.0 and table[(0.9, 0.5)] == 1.0


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
def test_overlap_table_and_claims_on_sets_that_nest(seeds_agree):
    cfg = make_config("smoke")
    members = study_members(cfg)
    torch.manual_seed(0)

    # Every member samples a square whose side shrinks as beta grows (nested), centred at the
    # origin, or, when seeds disagree, at a different place for every seed.
    def draw(m):
        return (0.05 + 1.0 - m.beta) * (torch.rand(400, 2) - 0.5) + (
            0 if seeds_agree else 5 * m.seed)
    samples, redraws = {m: draw(m) for m in members}, {m: draw(m) for m in members}
    pairs = overlap_pairs(cfg, members)
    kinds = [kind for kind, _, _ in pairs]
    steps = len(cfg.mesa.betas) - 1
    assert kinds.count("staircase") == 3 * steps and kinds.count("second draw") == 3 * 3
    assert kinds.count("other seed") == 3
    for kind, inner, outer in pairs:
        assert inner.beta >= outer.beta
        assert (inner.seed == outer.seed) == (kind != "other seed")
        assert (inner == outer) == (kind == "second draw")
    overlap = overlap_table(pairs, samples, redraws)
    staircase = overlap[overlap.comparison == "staircase"]
    second = overlap[overlap.comparison == "second draw"]
    assert (staircase.inner_in_outer > 0.9).all() and (staircase.outer_in_inner < 0.7).all()
    assert (second[["inner_in_outer", "outer_in_inner"]] > 0.85).all().all()
    # alpha 0: 5 distinct triggers and low entropy; alpha 0.1: 40; alpha 10 loses ASR.
    settings = pd.DataFrame([{"seed": m.seed, "alpha": m.alpha, "beta": m.beta,
                              "distinct": {0.0: 5, 10.0: 300}.get(m.alpha, 40),
                              "entropy": {0.0: -80.0, 10.0: -5.0}.get(m.alpha, -20.0),
                              "asr": 0.3 if m.alpha == 10 else 0.95} for m in members])
    # Every staircase sub-model valid for its own beta, 30% of a lower one in the next band.
    validity = pd.DataFrame([{"seed": m.seed, "alpha": m.alpha, "beta": m.beta,
                              "threshold": t, "valid": 1.0 if t <= m.beta else 0.7}
                             for m in members for t in cfg.mesa.betas])
    claims = hyperparameter_claims(cfg, settings, overlap, validity).set_index("claim")
    seed_claim = claims.index.str.startswith("one setting from two seeds")
    assert claims.cases.tolist() == [3, 3, 3, 9, 6, 6, 6, 3]   # seeds, members, pairs
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


def test_screen_agreement_on_rankings_with_known_answers():
    from mesa_utils.analysis import overlap_p_value, screen_agreement, spearman_rho
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    first = pd.Series(rng.random(51), index=range(100, 151))
    same = screen_agreement(first, first * 0.5 + 0.1)       # a monotone map: the same ranking
    assert same["triggers"] == 51 and same["rho"] == pytest.approx(1)
    assert same["rho_low"] == pytest.approx(1) and same["top_k"] == 10
    assert same["top_overlap"] == 10
    assert same["top_overlap_p"] == pytest.approx(1 / math.comb(51, 10))
    reversed_ = screen_agreement(first, -first)
    assert reversed_["rho"] == pytest.approx(-1) and reversed_["top_overlap"] == 0
    assert reversed_["top_overlap_p"] == 1
    unrelated = screen_agreement(first, pd.Series(rng.random(51), index=first.index))
    assert unrelated["rho_low"] < 0 < unrelated["rho_high"]     # nothing shared: 0 inside
    assert unrelated["chance_overlap"] == pytest.approx(100 / 51)
    # only the triggers both hold (a replicate of every third), nan dropped, ids aligned
    shuffled = first.iloc[::3].sample(frac=1, random_state=0)
    part = screen_agreement(first, shuffled.where(shuffled.index != 100))
    assert part["triggers"] == 16 and part["rho"] == pytest.approx(1) and part["top_k"] == 3
    with pytest.raises(ValueError, match="at least 4 shared triggers"):
        screen_agreement(first, first.iloc[:3])
    with pytest.raises(ValueError, match="finite"):
        screen_agreement(first, first.replace(first.iloc[0], np.inf))
    # rho with ties is scipy's; a batch of rows is each row's
    x, y = np.array([1, 2, 2, 3, 5.0]), np.array([2, 1, 4, 4, 9.0])
    assert spearman_rho(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.allclose(spearman_rho(np.stack([x, x]), np.stack([y, -y])),
                       [spearmanr(x, y).statistic, -spearmanr(x, y).statistic])
    # the hypergeometric tail: P(>= 0) = 1, and the mean overlap k^2/n from its pmf
    assert overlap_p_value(0, 10, 51) == 1
    pmf = [overlap_p_value(x, 10, 51) - overlap_p_value(x + 1, 10, 51) for x in range(10)]
    pmf.append(overlap_p_value(10, 10, 51))
    assert sum(x * p for x, p in enumerate(pmf)) == pytest.approx(100 / 51)


@pytest.mark.parametrize("lows, follows", [
    ((-0.1, 0.3, 0.3), "noise"),                  # a second retraining already disagrees
    ((0.2, -0.05, 0.3), "backdoored model"),
    ((0.2, 0.1, -0.2), "clean model and target"),
    ((0.2, 0.1, 0.05), "pattern"),
])
def test_hardness_verdict_names_the_first_replicate_that_fails(lows, follows):
    from mesa_utils.analysis import (REPLICATES, VERDICT_CHAIN, VERDICT_READINGS,
                                     hardness_verdict)
    rows = pd.DataFrame({"screen": [*VERDICT_CHAIN, "rebuild"], "rho_low": [*lows, -0.5],
                         "top_overlap_p": (0.01, 0.2, 0.04, 0.5)})
    verdict = hardness_verdict(rows)
    assert verdict["follows"] == follows and verdict["reading"] == VERDICT_READINGS[follows]
    assert verdict["reproduced"] == {**dict(zip(VERDICT_CHAIN, (low > 0 for low in lows))),
                                     "rebuild": False}
    assert verdict["top_reproduced"] == {"retraining": True, "attack seed": False,
                                         "model and target": True, "rebuild": False}
    # the rebuild is reported, not part of the chain; a replicate of the chain missing is not
    assert hardness_verdict(rows.iloc[:3])["follows"] == follows
    assert hardness_verdict(rows.iloc[1:])["follows"] == "undetermined"
    assert set(VERDICT_CHAIN) < set(REPLICATES)


def test_the_same_build_units_hold_two_screens():
    from mesa_utils.analysis import held_out_series
    rows = pd.DataFrame({"trigger": [0, 0, 3, 3], "repeat": [0, 1, 0, 1],
                         "holdout_asr": [0.1, 0.2, 0.3, 0.4]})
    series = held_out_series("same build", rows)
    assert list(series) == ["rebuild", "retraining"]
    assert series["rebuild"].to_dict() == {0: 0.1, 3: 0.3}
    assert series["retraining"].to_dict() == {0: 0.2, 3: 0.4}
    plain = held_out_series("attack seed", rows.drop(columns="repeat"))
    assert plain["attack seed"].to_dict() == pytest.approx({0: 0.15, 3: 0.35})


def test_the_contrast_verdict_reads_the_intervals_of_mesa_baseline_and_ideal():
    from mesa_utils.analysis import contrast_verdict

    def rows(rate, mesa, baseline, ideal):
        return [{"rate": rate, "method": m, "runs": 9, "mean_%": sum(iv) / 2, "low_%": iv[0],
                 "high_%": iv[1], "worst_%": iv[1]}
                for m, iv in (("mesa_mixture", mesa), ("mesa beta=0.9", (0, 99)),
                              ("baseline", baseline), ("ideal", ideal))]
    means = pd.DataFrame(rows(0.1, (4, 6), (7, 11), (3, 5)) + rows(0.025, (15, 25), (14, 30),
                                                                   (7, 10)))
    verdict = contrast_verdict(means).set_index("rate")
    assert list(verdict.index) == [0.025, 0.1]
    assert verdict.loc[0.1, "finding"] == "MESA lower" and verdict.loc[0.1, "gap_points"] == 4
    assert not verdict.loc[0.1, "both_above_ideal"]            # MESA's 4-6 reaches the ideal's
    assert verdict.loc[0.025, "finding"] == "overlap" and verdict.loc[0.025, "both_above_ideal"]
    assert verdict.loc[0.025, "baseline_mean"] == 22 and verdict.loc[0.025, "ideal_high"] == 10
    worse = contrast_verdict(pd.DataFrame(rows(0.1, (12, 14), (7, 11), (3, 5))))
    assert worse.finding.tolist() == ["baseline lower"]
    with pytest.raises(ValueError, match=r"rate 0.025: the contrast needs rows for \['ideal'\]"):
        contrast_verdict(means[means.method != "ideal"])


def _summary(means):
    """A summarize-like table: method -> (mean, low, high, worst) in %."""
    return pd.DataFrame([{"method": m, "runs": 3, "mean_asr_%": v[0], "mean_asr_low_%": v[1],
                          "mean_asr_high_%": v[2], "worst_asr_%": v[3], "clean_change_pts": c}
                         for c, (m, v) in enumerate(means.items())])


def test_04s_conclusions_compare_the_fixed_mixture_not_the_best_variant():
    means = {"before defence": (99, 98, 100, 100), "mesa beta=0.9": (1, 0.5, 1.5, 2),
             "mesa_mixture": (5, 4, 6, 7), "baseline": (8, 7, 9, 12),
             "neural_cleanse": (9, 8, 10, 11), "neural_cleanse_crop": (6, 5, 7, 8),
             "ideal": (2, 1.5, 2.5, 3), "finetune": (95, 94, 96, 97),
             "random_patch": (80, 70, 90, 92)}
    lines = defense_conclusions(_summary(means))
    assert lines[1].startswith("MESA's mixture (the variant every comparison uses): 5.0% "
                               "[4.0, 6.0] over 3 runs, worst 7.0%")
    assert "mesa beta=0.9 1.0%" in lines[1]       # the better variant is shown, not chosen
    assert lines[3].startswith("Neural Cleanse: 9.0% [8.0, 10.0]")
    assert lines[4].startswith("Ideal defence (the true trigger): 2.0%")
    assert "MESA's mixture is below the random-patch control" in lines[5]
    assert lines[6].startswith("MESA's mixture against the baseline: MESA's interval lies "
                               "below the baseline's; worst runs 7.0% against 12.0%")
    assert lines[7] == ("Clean accuracy changed by +1.0 to +6.0 points over the retrained "
                        "methods.")
    means["mesa_mixture"] = (8, 6, 10, 12)          # now overlapping the baseline's interval
    assert "the intervals overlap" in defense_conclusions(_summary(means))[6]


def test_algorithm_1s_weights_come_from_the_staircases_rows():
    from mesa_utils.analysis import entropy_weight_table
    rows = [(1, 0.5, 1.0, False), (1, 0.8, 2.0, False), (1, 0.9, 0.5, True), (2, 0.5, 1.0, True)]
    table = entropy_weight_table(pd.DataFrame(rows, columns=["trigger", "beta", "mi", "empty"]))
    # gamma ~ e^mi x step width (0.5, 0.3, 0.1), 0 when empty; trigger 2 has no mixture
    expected = [0.5 * math.e, 0.3 * math.e ** 2]
    assert table.trigger.tolist() == [1, 1, 1]
    assert table.gamma.tolist() == pytest.approx([e / sum(expected) for e in expected] + [0])


def test_04s_conclusions_read_only_the_methods_that_ran():
    means = {"before defence": (99, 98, 100, 100), "mesa_mixture": (5, 4, 6, 7),
             "baseline": (8, 7, 9, 12), "finetune": (95, 94, 96, 97)}
    lines = defense_conclusions(_summary(means))
    assert lines[1].endswith("worst 7.0%.")       # no other MESA variant ran
    assert not any("Neural Cleanse" in line or "Ideal" in line for line in lines)
    assert lines[3] == "Controls: fine-tuning with no trigger 95.0% [94.0, 96.0] over 3 runs, " \
                       "worst 97.0%."           # no random-patch control: no finding about it
    assert lines[-1] == ("Clean accuracy changed by +1.0 to +2.0 points over the retrained "
                         "methods.")


def test_03s_findings_read_the_tables_they_are_given():
    cfg = make_config("smoke")          # alphas 0, 0.1, 10 at beta 0.8; betas 0.5, 0.8, 0.9
    claims = pd.DataFrame([{"claim": "alpha 0 collapses", "holds": 1, "cases": 3}])
    summary = pd.DataFrame([{"alpha": a, "beta": 0.8, "entropy": e, "entropy_min": e - 1,
                             "entropy_max": e + 1, "distinct": d, "asr": r, "mi": mi}
                            for a, e, d, r, mi in [(0.0, -80, 5, 0.99, 0.01),
                                                   (0.1, -20, 40, 0.97, 1.5),
                                                   (10.0, -5, 300, 0.30, 3.25)]])
    # Precision 100% at each own beta; 70% of a sub-model above the next beta: 30% in the band.
    validity = pd.DataFrame([{"alpha": 0.1, "beta": b, "threshold": t,
                              "valid": 1.0 if t <= b else 0.7}
                             for b in cfg.mesa.betas for t in cfg.mesa.betas])
    staircase = validity.assign(valid=lambda v: v.valid.where(v.threshold <= v.beta, 0.9))
    overlap = pd.DataFrame([{"comparison": c, "inner_in_outer": i, "outer_in_inner": o}
                            for c, i, o in [("staircase", 0.95, 0.5), ("second draw", 0.9, 0.9),
                                            ("other seed", 0.2, 0.3)]])
    lines = hyperparameter_findings(cfg, claims, summary, overlap, validity, staircase)
    assert lines[0] == "alpha 0 collapses: holds in **1 of 3**."
    assert lines[1].startswith("At beta = 0.8 (mean over seeds, range in brackets): alpha = 0 "
                               "has k-NN entropy -80 nats [-81, -79] and 5 distinct triggers; "
                               "alpha = 0.1 -20 nats [-21, -19] and 40; alpha = 10 -5 nats "
                               "with ASR 30% against 97% at alpha = 0.1.")
    assert lines[1].endswith("alpha = 0 0.01 nats, alpha = 0.1 1.50 nats, alpha = 10 3.25 nats.")
    assert lines[2].endswith("beta = 0.5 100%, beta = 0.8 100%, beta = 0.9 100%; in the band "
                             "up to the next beta: (0.5, 0.8]: 30%, (0.8, 0.9]: 30%.")
    assert "(0.5, 0.8]: 10%, (0.8, 0.9]: 10%." in lines[3]
    assert lines[4] == ("k-NN overlap: the higher-beta samples lie in the lower-beta "
                        "generator's range at 0.95 (the reverse 0.50), against 0.90 for a second "
                        "draw of one generator and 0.30 for one setting from two seeds.")


def test_run_differences_are_the_gaps_in_points_over_the_shared_triggers():
    from mesa_utils.analysis import run_differences
    reference = pd.DataFrame({"trigger": [1, 1, 2, 3], "asr_after": [0.1, 0.3, 0.5, 0.9]})
    replicate = pd.DataFrame({"trigger": [1, 2, 4], "asr_after": [0.25, 0.2, 0.0]})
    gaps = run_differences(reference, replicate, columns=("asr_after",))
    # trigger 1: mean 0.2 against 0.25 (5 points); trigger 2: 30 points; 3 and 4 unshared
    assert gaps["triggers"] == 2
    assert gaps["asr_after_mean_pts"] == pytest.approx(17.5)
    assert gaps["asr_after_max_pts"] == pytest.approx(30.0)
