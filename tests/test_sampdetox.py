"""SampDetox: the DDPM's noising against its closed form, per-pixel denoising, the visibility
map, and CA/PA/ASR on a toy with known answers."""
import math

import pytest
import torch
import torch.nn as nn

from mesa_utils.config import make_config
from mesa_utils.data import to_pixels
from mesa_utils.sampdetox import (alpha_bar, defence_metrics, denoise_from_levels,
                                  levels_from_ssim, new_scheduler, new_unet, noise_to_levels,
                                  ssim_map, to_images)
from mesa_utils.triggers import apply_trigger, trigger_from_id


def cosine_alpha_bar(level, T=1000, s=0.008):
    """Nichol and Dhariwal's alpha_bar after `level` forward steps, written out."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(level) / f(0)


def test_noising_matches_the_closed_form_of_the_cosine_schedule():
    scfg = make_config("smoke").sampdetox
    scheduler = new_scheduler(scfg)
    levels = torch.tensor([0, 1, 20, 120, 500])
    expected = torch.tensor([cosine_alpha_bar(int(L)) for L in levels])
    assert torch.allclose(alpha_bar(scheduler, levels), expected, rtol=1e-4, atol=1e-6)
    x, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    for level in (1, 20, 120):
        ours = noise_to_levels(scheduler, x, torch.tensor(level), noise)
        a = cosine_alpha_bar(level)
        assert torch.allclose(ours, math.sqrt(a) * x + math.sqrt(1 - a) * noise, atol=1e-5)
        # and diffusers' own add_noise at its timestep level - 1
        theirs = scheduler.add_noise(x, noise, torch.tensor([level - 1] * 2))
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.equal(noise_to_levels(scheduler, x, torch.tensor(0), noise), x)


def test_denoising_from_levels_leaves_level_zero_pixels_unchanged(toy_ctx):
    scfg = toy_ctx.cfg.sampdetox
    torch.manual_seed(0)
    unet, scheduler = new_unet(scfg).eval(), new_scheduler(scfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    levels = torch.randint(0, 6, (2, 1, 32, 32))
    levels[:, :, :8] = 0                                    # a band of clean pixels
    out = denoise_from_levels(toy_ctx, unet, scheduler, x, levels,
                              torch.Generator().manual_seed(0))
    still = (levels == 0).expand_as(x)
    assert torch.equal(out[still], x[still])
    assert (out[~still] != x[~still]).float().mean() > 0.99     # every other pixel moved


def test_visibility_is_lowest_where_a_patch_was_pasted_on_a_constant_image():
    grey = torch.full((1, 3, 32, 32), 0.5)
    patched = apply_trigger(grey, trigger_from_id(170), torch.tensor([[10, 20]]))
    ssim = ssim_map(patched, grey)                          # as if denoising removed the patch
    assert ssim.shape == (1, 32, 32)
    assert ssim[0, 10:13, 20:23].max() < 0.5                # low on the patch
    assert torch.allclose(ssim[0, :, :5], torch.ones(32, 5))    # far from it: identical
    assert ssim_map(grey, grey).eq(1).all()
    levels = levels_from_ssim(ssim, 120)
    assert levels.shape == (1, 1, 32, 32)
    assert levels[0, 0, 10:13, 20:23].min() > 60 and levels.max() == 120
    assert levels[0, 0, :, :5].eq(0).all()
    assert levels_from_ssim(torch.ones(2, 32, 32), 120).eq(0).all()     # constant: no noise


class CodeReader(nn.Module):
    """Toy classifier: the class is written in the top-left pixel's red value (class k at
    k * 20 / 255); logits are one-hot."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, pixels):
        code = (pixels[:, 0, 0, 0] * 255 / 20).round().long().clamp(0, self.num_classes - 1)
        return 10 * nn.functional.one_hot(code, self.num_classes).float() + self.dummy


def coded(classes):
    images = torch.zeros(len(classes), 32, 32, 3, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.uint8) * 20
    return images


def test_ca_pa_asr_on_a_toy_with_known_answers(toy_ctx):
    from dataclasses import replace
    ctx = replace(toy_ctx, splits=replace(toy_ctx.splits, classes=[str(c) for c in range(10)]))
    labels = torch.arange(10).repeat(10)                    # 100 clean images
    shown = labels.clone()
    shown[:30] = (labels[:30] + 1) % 10                     # 30 misread: CA 70%
    true = torch.tensor([1, 2, 3, 4, 5] * 20)               # 100 attacked, none of class 0
    read = true.clone()
    read[:25] = 0                                           # 25 sent to the target: ASR 25%
    read[25:40] = 9                                         # 15 wrong otherwise: PA 60%
    read[25:40][true[25:40] == 9] = 8
    row = defence_metrics(ctx, CodeReader(), coded(shown.tolist()), labels,
                          coded(read.tolist()), true, target=0)
    assert row["ca"] == pytest.approx(0.70) and row["asr"] == pytest.approx(0.25)
    assert row["pa"] == pytest.approx(0.60)
    assert row["ca_low"] < 0.70 < row["ca_high"] and row["asr_high"] - row["asr_low"] < 0.2
    with pytest.raises(ValueError, match="outside the target class"):
        defence_metrics(ctx, CodeReader(), coded([0]), torch.tensor([0]), coded([0]),
                        torch.tensor([0]), target=0)


def test_images_round_trip_through_pixels():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(to_images(to_pixels(images)), images)
