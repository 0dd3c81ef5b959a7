"""The cost model counts each stage's images with known answers (quick's, by hand)."""
import pytest

from mesa_utils import cost
from mesa_utils.config import make_config
from mesa_utils.methods import DEFAULT_METHODS, METHODS


def test_each_stage_counts_the_images_it_trains_on():
    cfg = make_config("quick")      # 3 triggers; 5 methods, the baseline's 3 starts
    images = cost.stage_images(cfg)
    assert images["clean model"] == 8 * 50000
    stages = images["per trigger"]
    assert cost.retrainings_per_unit(cfg) == 5 * 3     # 3 seeds each, the baseline 3 starts
    assert stages["attack"] == 50000 and stages["retrainings"] == 15 * 4 * 8000
    assert stages["detection"] == 200 * 10 * 32 and stages["staircase"] == 300 * 3 * 64
    assert stages["baseline"] == 55 * 3 * 128 and "neural cleanse" not in stages
    assert stages["evaluation"] == pytest.approx((2 * 2000 * 16 + 10 * 2500 + 3 * 1000) / 3)
    every = make_config("quick", defense_methods=DEFAULT_METHODS)
    # the 3 sub-models and 7 other sources from 3 seeds, the baseline once per start: 04 of
    # 2026-12-03 ran 165 for five triggers
    assert cost.retrainings_per_unit(every) == (3 + 7) * 3 + 3 == 165 // 5
    assert cost.stage_images(every)["per trigger"]["neural cleanse"] == 300 * 10 * 32
    # the size-free MESA: one more source from 3 seeds, and a second staircase to train
    free = make_config("quick", defense_methods=tuple(METHODS))
    assert cost.retrainings_per_unit(free) == 36
    assert cost.stage_images(free)["per trigger"]["staircase"] == 2 * 300 * 3 * 64


def test_minutes_scale_with_the_measured_pace():
    cfg = make_config("quick")
    one_ms = cost.predicted_minutes(cfg, 1e-3)
    assert one_ms["clean model"] == pytest.approx(400000 * 1e-3 / 60)
    assert one_ms["run"] == pytest.approx(one_ms["clean model"] + 3 * one_ms["per trigger"])
    assert cost.predicted_minutes(cfg, 2e-3)["run"] == pytest.approx(2 * one_ms["run"])
