"""Notebook 09's pieces: shaped triggers, the transparency blend, the size-free generators on a
classifier with a known answer, and 09's tables."""
import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mesa_utils import mesa, unknown_size
from mesa_utils.config import make_config, validate
from mesa_utils.stages import BACKDOOR
from mesa_utils.store import Store
from mesa_utils.train import Context
from mesa_utils.triggers import (SHAPES, TRIGGER_SETS, apply_trigger, random_positions,
                                 shape_mask, trigger_from_id, trigger_pattern, trigger_size)
from tests.conftest import make_splits


def test_the_blend_at_transparency_one_is_the_paste_exactly():
    g = torch.Generator().manual_seed(0)
    images, colour = torch.rand(16, 3, 32, 32, generator=g), torch.rand(16, 3, 6, 6, generator=g)
    corners = random_positions(16, (32, 32), (6, 6), generator=g)
    opaque = torch.cat([colour, torch.ones(16, 1, 6, 6)], 1)
    assert torch.equal(apply_trigger(images, opaque, corners),
                       apply_trigger(images, colour, corners))


def test_the_blend_mixes_by_transparency_inside_the_window_only():
    images = torch.full((1, 3, 8, 8), 0.2)
    trigger = torch.cat([torch.full((3, 2, 2), 1.0), torch.tensor([[[0.25, 0.0], [1.0, 0.5]]])])
    out = apply_trigger(images, trigger, torch.tensor([[3, 4]]))
    window = out[0, 0, 3:5, 4:6]
    assert torch.allclose(window, torch.tensor([[0.4, 0.2], [1.0, 0.6]]))
    outside = out.clone()
    outside[..., 3:5, 4:6] = 0.2
    assert torch.equal(outside, images)


def test_gradients_reach_colour_and_transparency():
    trigger = torch.full((4, 3, 3), 0.5, requires_grad=True)
    apply_trigger(torch.zeros(2, 3, 8, 8), trigger).sum().backward()
    assert (trigger.grad[:3] != 0).all() and (trigger.grad[3] != 0).all()


def test_a_trigger_of_the_wrong_channels_is_refused_by_name():
    with pytest.raises(ValueError, match=r"C=3 \(or C=4: colour and transparency\)"):
        apply_trigger(torch.zeros(1, 3, 8, 8), torch.zeros(5, 2, 2))


def test_shaped_triggers_have_their_shape_and_are_the_same_on_every_call():
    assert trigger_size("black_white") == trigger_size("random_colour") == "3x3"
    for trigger_set, shape in TRIGGER_SETS.items():
        trigger = trigger_pattern(trigger_set, 0)
        mask = shape_mask(shape)
        assert trigger.shape[1:] == mask.shape
        assert torch.equal(trigger, trigger_pattern(trigger_set, 0))
        if trigger_set.startswith("black_white_"):
            assert set(trigger[:3].unique().tolist()) <= {0.0, 1.0}
            assert not torch.equal(trigger, trigger_pattern(trigger_set, 1))
    line, corner = trigger_pattern("black_white_1x5", 0), trigger_pattern("black_white_L4x4", 0)
    assert line.shape == (3, 1, 5)
    assert corner.shape == (4, 4, 4) and torch.equal(corner[3], shape_mask("L4x4"))
    assert int(corner[3].sum()) == 7 and set(SHAPES) >= {"2x2", "4x4", "5x5", "1x5", "L4x4"}
    assert [unknown_size.shape_label(s) for s in ("black_white_L4x4", "random_colour")] == [
        "L4x4", "3x3 colour"]
    assert [unknown_size.trigger_pixels(s) for s in ("black_white_L4x4", "random_colour")] == [
        7, 9]
    # an L pasted over grey changes its 7 pixels, never the rest of its window
    out = apply_trigger(torch.full((1, 3, 4, 4), 0.5), corner, torch.tensor([[0, 0]]))
    assert torch.equal(out[0, :, shape_mask("L4x4") == 0], torch.full((3, 9), 0.5))


def test_an_unknown_shape_or_a_bad_number_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown trigger shape '3x4'; choose one of 3x3, 2x2"):
        shape_mask("3x4")
    with pytest.raises(ValueError, match="numbered by an integer >= 0, got -1"):
        trigger_pattern("black_white_5x5", -1)


def test_the_black_white_ids_and_their_keys_are_unchanged():
    """Keys computed by the code before shaped triggers existed (commit e8c9a94)."""
    assert trigger_pattern("black_white", 170).equal(trigger_from_id(170))
    for profile, backdoor, colour, staircase in (
            ("quick", "ceb89a5be9dc5c24", "cdd8511cbc61aa69", "09fddd578845d207"),
            ("paper", "912937943f9d8afd", "8410d12280424c78", "b9c2990247911c14")):
        cfg = make_config(profile)
        assert BACKDOOR.key(cfg, "parent", trigger=170, attack_seed=0) == backdoor
        assert BACKDOOR.key(dataclasses.replace(cfg, trigger_set="random_colour"), "parent",
                            trigger=0, attack_seed=0) == colour
        assert mesa.spec_key(mesa.bank_spec(SimpleNamespace(cfg=cfg), "parent",
                                            mesa.staircase_members(cfg))) == staircase
        free = mesa.bank_spec(SimpleNamespace(cfg=cfg), "parent", mesa.staircase_members(cfg),
                              size_free=True)
        assert free["stage"] == "mesa_free" and free["trigger_shape"] == [4, 8, 8]


def test_the_pattern_detector_fires_on_its_pattern_anywhere_and_nowhere_else():
    pattern = trigger_pattern("black_white_4x4", 0)
    detector = unknown_size.PatternDetector(pattern, num_classes=3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 32, 32, generator=g)
    clean = detector(images).softmax(1)[:, 0]
    fired = detector(apply_trigger(images, pattern, generator=g)).softmax(1)[:, 0]
    assert clean.max() < 0.01 and fired.min() > 0.99


def known_answer(cost, seeds=(0,)):
    cfg = make_config("quick", device="cpu", amp="off")
    ctx = Context(cfg, make_splits(num_classes=2), torch.device("cpu"), None, Store("unused"))
    images = torch.randint(0, 256, (512, 32, 32, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    mcfg = dataclasses.replace(cfg.mesa, steps=200, batch_size=32, hidden=64, eval_samples=256)
    return pd.DataFrame(unknown_size.known_answer_rows(ctx, [cost], seeds, mcfg, images))


def test_size_free_generators_find_the_known_4x4_pattern_at_about_its_area():
    """Against a classifier that fires on one 4x4 pattern only, a size-free generator (window
    8x8) with the transparency cost fires it on every sample with an opaque area near the
    pattern's 16 pixels; without the cost the window stays mostly opaque (measured: 53-54 of
    64 pixels at cost 0, 15-16 at cost 1)."""
    with_cost = known_answer(1.0).iloc[0]
    assert with_cost.asr >= 0.9 and with_cost.pattern_pixels == 16
    assert 10 <= with_cost.opaque_pixels <= 24
    without = known_answer(0.0).iloc[0]
    assert without.asr >= 0.9 and without.opaque_pixels >= 40


def test_mesa_free_retrains_with_the_size_free_staircases_mixture(toy_ctx, monkeypatch):
    import mesa_utils.defense as defense
    built = []

    def staircase_bank(ctx, backdoor, size_free=False):
        built.append(size_free)
        return SimpleNamespace(members=[mesa.Member(0.9, 0.1, 0)], key=f"bank {size_free}",
                               sampler=lambda: "mixture")
    monkeypatch.setattr(defense, "staircase_bank", staircase_bank)
    backdoor = SimpleNamespace(trigger=0, target=0, key="k", source=lambda: "original")
    (run,) = defense.defense_sources(toy_ctx, backdoor, ["mesa_free"])
    assert built == [True] and run.method == "mesa_free" and run.source == "mixture"
    assert run.spec["bank"] == "bank True"
    assert "mesa_free" not in make_config("paper").defense_methods     # 04 runs it when named


def test_the_comparison_context_retrains_as_09_says():
    ctx = SimpleNamespace(cfg=make_config("quick"))
    ctx = Context(ctx.cfg, None, torch.device("cpu"), None, None)
    at = unknown_size.comparison_context(ctx, "black_white_5x5").cfg
    validate(at)
    assert at.trigger_set == "black_white_5x5" and at.defense_methods == unknown_size.COMPARED
    assert (at.defense.epochs, at.defense.poison_rate) == (1, 0.2)
    assert at.defense.lr == ctx.cfg.defense.lr


def rows(shape, method, asr, runs=3):
    return [{"trigger_size": shape, "method": method, "beta": None, "trigger": 0,
             "asr_after": asr + 0.001 * k, "clean_before": 0.8, "clean_after": 0.79}
            for k in range(runs)]


def test_the_findings_say_where_the_size_free_mesa_fails():
    runs = pd.DataFrame(rows("5x5", "mesa_free", 0.02) + rows("5x5", "random_patch", 0.6)
                        + rows("5x5", "mesa_mixture", 0.5) + rows("2x2", "mesa_free", 0.6)
                        + rows("2x2", "random_patch", 0.6) + rows("2x2", "mesa_mixture", 0.1))
    summary = unknown_size.summary_table(runs)
    assert summary.runs.tolist() == [3] * 6
    assert summary.clean_change_pts.tolist() == [-1.0] * 6
    detected = pd.DataFrame({"trigger": ["a", "b"], "correct": [True, False],
                             "flagged_classes": [[0], [3]], "margin": [0.5, -0.2]})
    generators = pd.DataFrame({"generator": ["size-free"] * 2, "trigger_size": ["5x5", "2x2"],
                               "opaque_pixels": [20.0, 9.0], "trigger_pixels": [25, 4]})
    lines = unknown_size.findings(summary, detected, generators)
    assert "**5x5**: size-free MESA 2.1% [" in lines[0]
    assert "MESA assuming 3x3 50.1%" in lines[0] and "(below)" in lines[0]
    assert "MESA assuming 3x3 10.1%" in lines[1] and "(above)" in lines[1]
    assert "random-patch control (95% intervals) on: 2x2." in lines[2]
    assert "on 1 of 2 triggers (not on b: flagged [3])" in lines[3]
    assert "5x5 20.0 vs 25; 2x2 9.0 vs 4" in lines[4]
