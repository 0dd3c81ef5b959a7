"""MESA on problems whose answer is known."""
import math

import pytest
import torch

from mesa_utils import mesa
from mesa_utils.config import MesaConfig
from mesa_utils.analysis import spread
from mesa_utils.mesa import (GeneratorSampler, Member, dv_bound, entropy_weights, evaluate_bank,
                             hyperparameter_study, mesa_bank, mine_step, study_members,
                             study_settings, train_bank)
from mesa_utils.models import GeneratorBank, StatisticsBank
from mesa_utils.train import Backdoor
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


def _train(ctx, members, steps=25, model=None, hidden=32, batch_size=32):
    mcfg = MesaConfig(steps=steps, batch_size=batch_size, hidden=hidden, lr=1e-3)
    model = model or BrightPatchModel(num_classes=3)
    return train_bank(ctx, model, members, mcfg, ctx.splits.defense_images,
                      ctx.splits.defense_labels)


@pytest.mark.parametrize("chunk", [4096, 16])  # the bank's classifier pass whole, in pieces
def test_bank_trains_exactly_like_separate_generators(toy_ctx, monkeypatch, chunk):
    monkeypatch.setattr(mesa, "CPU_CLASSIFIER_CHUNK", chunk)
    members = [Member(0.8, 0.1, 0, seed=3), Member(0.5, 0.0, 0, seed=4),
               Member(0.9, 1.0, 0, seed=5)]
    bank, _, bank_log = _train(toy_ctx, members)
    z = bank.noise(64, torch.Generator().manual_seed(0))
    for i, member in enumerate(members):
        single, _, single_log = _train(toy_ctx, [member])
        # Equal up to float summation order (batched vs single matmuls, through Adam; the
        # order depends on the CPU's BLAS: 6e-4 on an Intel Xeon, 2.4e-3 on an AMD EPYC) ...
        assert (bank(z)[i] - single(z[i:i + 1])[0]).abs().max() < 1e-2, i
        assert torch.allclose(bank_log["hinge"][:, i], single_log["hinge"][:, 0], atol=2e-3)
    # ... which is far below what another seed changes (0.42 on the AMD EPYC).
    other, _, _ = _train(toy_ctx, [Member(0.8, 0.1, 0, seed=99)])
    assert (bank(z)[0] - other(z[:1])[0]).abs().max() > 0.2


def test_generator_learns_the_known_valid_set_and_alpha_spreads_it(toy_ctx):
    # Black images; valid triggers are those brighter than VALID_BRIGHTNESS on average.
    # (alpha = 1 here: this toy's hinge is flat once satisfied, and alpha = 0.1 spreads it
    # too slowly for a unit test's 400 steps.)
    members = [Member(0.8, 0.0, 0, seed=0), Member(0.8, 1.0, 0, seed=1)]
    bank, stats, log = _train(toy_ctx, members, steps=400, hidden=128, batch_size=64)
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
    bank, stats, _ = _train(toy_ctx, members, steps=30)
    rows = evaluate_bank(toy_ctx, BrightPatchModel(), bank, stats, members, 64,
                         toy_ctx.splits.defense_images, toy_ctx.splits.defense_labels)
    assert rows[0]["empty"]


def test_detection_flags_only_the_backdoored_class(toy_ctx):
    # Images of class 2; the backdoor targets class 0; nothing makes class 1 win.
    members = [Member(0.8, 0.1, c, seed=c) for c in range(3)]
    model = BrightPatchModel(num_classes=3, target=0)
    bank, stats, _ = _train(toy_ctx, members, steps=150, model=model)
    rows = evaluate_bank(toy_ctx, model, bank, stats, members[:2], 256,
                         toy_ctx.splits.defense_images, toy_ctx.splits.defense_labels)
    flagged = [row["target"] for row in rows if row["asr"] > toy_ctx.cfg.detection.threshold]
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


class ToyBackdoor(Backdoor):
    """A Backdoor whose model is the toy BrightPatchModel."""

    def model(self, ctx):
        return BrightPatchModel()


def test_hyperparameter_study_trains_every_setting_from_each_seed(toy_ctx):
    cfg = toy_ctx.cfg
    bank = hyperparameter_study(toy_ctx, ToyBackdoor(170, 0, "toy", {}))
    settings = study_settings(cfg)
    n = len(settings)
    assert bank.members == study_members(cfg) and len(bank.members) == n * cfg.study.seeds
    assert [(m.alpha, m.beta) for m in bank.members] == settings * cfg.study.seeds
    assert bank.generators.k == len(bank.evaluation)
    # Within a seed: the same initial generator on the same noise and images, so the first
    # step (before any update) sees exactly the same mean softmax; another seed sees another.
    first = bank.log["softmax"][0]
    for s in range(cfg.study.seeds):
        assert len({m.seed for m in bank.members[s * n:(s + 1) * n]}) == 1
        assert len(set(first[s * n:(s + 1) * n].tolist())) == 1
    assert len(set(first[::n].tolist())) == cfg.study.seeds
    # Sub-models are addressed by what they are.
    reference = Member(cfg.study.beta, cfg.mesa.alpha, cfg.target, bank.members[n].seed)
    assert bank.evaluation_of(reference)["seed"] == reference.seed
    assert bank.sample(reference, 5).shape == (5, 3, 3, 3)
    with pytest.raises(KeyError, match="not in this bank"):
        bank.position(Member(0.123, 0.1, 0))


def test_a_bank_refuses_repeated_members(toy_ctx):
    with pytest.raises(ValueError, match="must be distinct"):
        mesa_bank(toy_ctx, BrightPatchModel(), "toy", [Member(0.8, 0.1, 0)] * 2,
                  toy_ctx.cfg.mesa)


