"""MESA on problems whose answer is known."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mesa_utils import mesa
from mesa_utils.config import MesaConfig, make_config
from mesa_utils.mesa import (GeneratorSampler, Member, coverage, distinct_triggers, dv_bound,
                             entropy_weights, evaluate_bank, hyperparameter_claims,
                             hyperparameter_members, hyperparameter_study, mine_step,
                             nesting_pairs, nesting_table, pca_2d, spread, thin, train_bank)
from mesa_utils.models import GeneratorBank, StatisticsBank
from tests.conftest import BrightPatchModel

# BrightPatchModel's valid set for beta = 0.8: mean trigger brightness above this (0.78).
VALID_BRIGHTNESS = BrightPatchModel().valid_brightness(0.8)


def test_dv_bound_of_identical_joint_and_marginal_is_zero():
    t = torch.randn(2, 1000)
    assert torch.allclose(dv_bound(t, t), t.mean(1) - (torch.logsumexp(t, 1) - math.log(1000)))
    assert torch.allclose(dv_bound(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def test_mine_estimates_the_mutual_information_of_correlated_gaussians():
    torch.manual_seed(0)
    dim, rho = 3, 0.9
    true_mi = -0.5 * dim * math.log(1 - rho ** 2)                 # 2.49 nats
    stats = StatisticsBank(1, noise_dim=dim, hidden=64, trigger_shape=(dim,), seeds=[0])
    optimizer = torch.optim.Adam(stats.parameters(), lr=1e-3)

    def sample(n):
        z = torch.randn(1, n, dim)
        x = rho * z + math.sqrt(1 - rho ** 2) * torch.randn(1, n, dim)
        return z, x
    log_ema = None
    for _ in range(1500):
        z, x = sample(256)
        log_ema, _ = mine_step(stats, optimizer, z, x, torch.randn(1, 256, dim), log_ema, 0.01)
    with torch.no_grad():
        z, x = sample(20000)
        estimate = float(dv_bound(stats(z, x), stats(torch.randn(1, 20000, dim), x))[0])
    assert 0.8 * true_mi < estimate < 1.05 * true_mi, (estimate, true_mi)


def _train(ctx, members, seeds, steps=25, model=None, hidden=32, batch_size=32):
    mcfg = MesaConfig(steps=steps, batch_size=batch_size, hidden=hidden, lr=1e-3)
    model = model or BrightPatchModel(num_classes=3)
    return train_bank(ctx, model, members, mcfg, ctx.splits.defense_images,
                      ctx.splits.defense_labels, seeds)


@pytest.mark.parametrize("chunk", [4096, 16])  # the bank's classifier pass whole, in pieces
def test_bank_trains_exactly_like_separate_generators(toy_ctx, monkeypatch, chunk):
    monkeypatch.setattr(mesa, "CPU_CLASSIFIER_CHUNK", chunk)
    members = [Member(0.8, 0.1, 0), Member(0.5, 0.0, 0), Member(0.9, 1.0, 0)]
    seeds = [3, 4, 5]
    bank, _, bank_log = _train(toy_ctx, members, seeds)
    z = bank.noise(64, torch.Generator().manual_seed(0))
    for i, (member, seed) in enumerate(zip(members, seeds)):
        single, _, single_log = _train(toy_ctx, [member], [seed])
        # Equal up to float summation order (batched vs single matmuls, through Adam; the
        # order depends on the CPU's BLAS: 6e-4 on an Intel Xeon, 2.4e-3 on an AMD EPYC) ...
        assert (bank(z)[i] - single(z[i:i + 1])[0]).abs().max() < 1e-2, i
        assert torch.allclose(bank_log["hinge"][:, i], single_log["hinge"][:, 0], atol=2e-3)
    # ... which is far below what another seed changes (0.42 on the AMD EPYC).
    other, _, _ = _train(toy_ctx, [members[0]], [99])
    assert (bank(z)[0] - other(z[:1])[0]).abs().max() > 0.2


def test_generator_learns_the_known_valid_set_and_alpha_spreads_it(toy_ctx):
    # Black images; valid triggers are those brighter than VALID_BRIGHTNESS on average.
    # (alpha = 1 here: this toy's hinge is flat once satisfied, and alpha = 0.1 spreads it
    # too slowly for a unit test's 400 steps.)
    members = [Member(0.8, 0.0, 0), Member(0.8, 1.0, 0)]
    bank, stats, log = _train(toy_ctx, members, [0, 1], steps=400, hidden=128, batch_size=64)
    n = 2000
    collapsed, spread_out = (GeneratorSampler(bank, [i]).sample(n) for i in range(2))
    for samples in (collapsed, spread_out):
        brightness = samples.flatten(1).mean(1)
        assert (brightness > VALID_BRIGHTNESS - 0.02).float().mean() > 0.9
    assert spread(spread_out) > 2 * spread(collapsed)
    assert log["mi"][-20:, 1].mean() > log["mi"][-20:, 0].mean()
    rows = evaluate_bank(toy_ctx, BrightPatchModel(), bank, stats, members, 256,
                         toy_ctx.splits.defense_images, toy_ctx.splits.defense_labels)
    assert all(row["asr"] > 0.9 and not row["empty"] for row in rows)


def test_unreachable_threshold_gives_an_empty_sub_model(toy_ctx):
    # Even a white trigger reaches only F = 0.997 on this model.
    members = [Member(0.9999, 0.1, 0)]
    bank, stats, _ = _train(toy_ctx, members, [0], steps=30)
    rows = evaluate_bank(toy_ctx, BrightPatchModel(), bank, stats, members, 64,
                         toy_ctx.splits.defense_images, toy_ctx.splits.defense_labels)
    assert rows[0]["empty"]


def test_detection_flags_only_the_backdoored_class(toy_ctx):
    # Images of class 2; the backdoor targets class 0; nothing makes class 1 win.
    members = [Member(0.8, 0.1, c) for c in range(3)]
    model = BrightPatchModel(num_classes=3, target=0)
    bank, stats, _ = _train(toy_ctx, members, [0, 1, 2], steps=150, model=model)
    rows = evaluate_bank(toy_ctx, model, bank, stats, members[:2], 256,
                         toy_ctx.splits.defense_images, toy_ctx.splits.defense_labels)
    flagged = [row["target"] for row in rows if row["asr"] > toy_ctx.cfg.detection_threshold]
    assert flagged == [0]


def test_mixture_samples_every_sub_model_uniformly():
    bank = GeneratorBank(3, hidden=8)
    _, member = GeneratorSampler(bank).sample(3000, torch.Generator().manual_seed(0),
                                              return_members=True)
    counts = torch.bincount(member, minlength=3)
    assert (counts > 900).all() and (counts < 1100).all()
    _, member = GeneratorSampler(bank, [0, 2], weights=[1, 3]).sample(
        4000, torch.Generator().manual_seed(0), return_members=True)
    assert set(member.tolist()) == {0, 2} and 0.7 < float((member == 2).float().mean()) < 0.8


@pytest.mark.parametrize("members, weights", [([], None), ([0, 1], [1.0]), ([0], [-1.0])])
def test_sampler_rejects_bad_mixtures(members, weights):
    with pytest.raises(ValueError):
        GeneratorSampler(GeneratorBank(2, hidden=8), members, weights)


def test_entropy_weights_follow_the_entropy_and_skip_empty_sub_models():
    weights = entropy_weights(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([False, False, True]))
    assert weights[2] == 0 and torch.isclose(weights[1] / weights[0], torch.tensor(math.e))
    with pytest.raises(ValueError, match="empty"):
        entropy_weights(torch.zeros(2), torch.ones(2, dtype=torch.bool))


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


def test_hyperparameter_study_trains_every_setting_from_each_seed(toy_ctx):
    cfg = toy_ctx.cfg
    generators, record, members, seeds = hyperparameter_study(toy_ctx, BrightPatchModel())
    settings = hyperparameter_members(cfg)
    n = len(settings)
    assert members == settings * cfg.hp_seeds and generators.k == len(record["evaluation"])
    # Within a seed: the same initial generator on the same noise and images, so the first
    # step (before any update) sees exactly the same mean softmax; another seed sees another.
    first = record["log"]["softmax"][0]
    for s in range(cfg.hp_seeds):
        assert len(set(seeds[s * n:(s + 1) * n])) == 1
        assert len(set(first[s * n:(s + 1) * n].tolist())) == 1
    assert len(set(first[::n].tolist())) == cfg.hp_seeds


def _study_layout(cfg):
    settings = hyperparameter_members(cfg)
    return settings * 3, [s for s in range(3) for _ in settings]


@pytest.mark.parametrize("seeds_agree", [True, False])
def test_nesting_table_and_claims_on_sets_that_nest(seeds_agree):
    cfg = make_config("smoke")
    members, seeds = _study_layout(cfg)
    torch.manual_seed(0)
    # Every member samples a square whose side shrinks as beta grows (nested), centred at the
    # origin, or, when seeds disagree, at a different place for every seed.
    samples = [(0.05 + 1.0 - m.beta) * (torch.rand(400, 2) - 0.5) + (0 if seeds_agree else 5 * s)
               for m, s in zip(members, seeds)]
    pairs = nesting_pairs(cfg, members, seeds)
    assert [kind for kind, _, _ in pairs].count("staircase") == 3 * (len(cfg.mesa.betas) - 1)
    for kind, inner, outer in pairs:
        assert members[inner].beta >= members[outer].beta
        assert (seeds[inner] == seeds[outer]) == (kind == "staircase")
    nesting = nesting_table(pairs, samples, [x.numpy() for x in samples], list(map(str, seeds)))
    staircase = nesting[nesting.comparison == "staircase"]
    assert (staircase.inner_in_outer > 0.9).all() and (staircase.outer_in_inner < 0.7).all()
    assert np.allclose(nesting.inner_in_outer, nesting.inner_in_outer_2d)   # already 2-D
    # alpha 0 with 5 distinct triggers and alpha 0.1 with 40 in every seed; alpha 10 empty.
    settings = pd.DataFrame([{"seed": s, "alpha": m.alpha, "beta": m.beta,
                              "distinct": {0.0: 5, 10.0: 300}.get(m.alpha, 40),
                              "asr": 0.3 if m.alpha == 10 else 0.95}
                             for m, s in zip(members, seeds)])
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
    from mesa_utils.mesa import detection_summary
    rows = [{"trigger": t, "class": c, "asr": asr, "flagged": asr > 0.5}
            for t, asrs in ((170, [0.95, 0.05, 0.02]), (15, [0.9, 0.7, 0.1]))
            for c, asr in enumerate(asrs)]
    table = detection_summary(pd.DataFrame(rows), target=0).set_index("trigger")
    assert table.loc[170, "correct"] and not table.loc[15, "correct"]
    assert table.loc[15, "flagged_classes"] == [0, 1]
    assert abs(table.loc[170, "margin"] - 0.90) < 1e-9
