import pytest

from mesa_utils.config import PROFILES, make_config


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_builds_and_validates(profile):
    cfg = make_config(profile)
    assert cfg.profile == profile and cfg.triggers


def test_paper_profile_has_the_papers_settings():
    cfg = make_config("paper")
    assert len(cfg.triggers) == 51 and cfg.width == 64 and cfg.target == 0
    assert (cfg.attack.epochs, cfg.attack.lr, cfg.attack.momentum, cfg.attack.poison_rate) == \
        (10, 1e-3, 0.9, 0.01)
    assert (cfg.mesa.steps, cfg.mesa.batch_size, cfg.mesa.lr, cfg.mesa.adam_betas) == \
        (620, 128, 2e-4, (0.5, 0.999))
    assert cfg.mesa.betas == (0.5, 0.8, 0.9) and cfg.mesa.alpha == 0.1
    assert (cfg.defense.epochs, cfg.defense.poison_rate, cfg.baseline.starts) == (10, 0.01, 10)


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("MESA_PROFILE", "smoke")
    assert make_config().profile == "smoke"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown profile 'fast'.*smoke, quick, paper"):
        make_config("fast")


def test_overrides_top_level_and_dotted():
    cfg = make_config("smoke", triggers=[170, 186], seed=3, **{"mesa.steps": 11,
                                                               "attack.lr": 1})
    assert cfg.triggers == (170, 186) and cfg.seed == 3
    assert cfg.mesa.steps == 11 and cfg.attack.lr == 1.0


@pytest.mark.parametrize("overrides, match", [
    ({"widht": 8}, "unknown config field 'widht'"),
    ({"mesa.stepz": 3}, "unknown config field 'mesa.stepz'"),
    ({"nosuch.steps": 3}, "unknown config section"),
    ({"width": "wide"}, "must be int"),
    ({"seed": True}, "must be int"),
    ({"triggers": [999]}, "unknown trigger id"),
    ({"triggers": [511]}, "same trigger as 0"),
    ({"target": 10}, "target class 10"),
    ({"attack.poison_rate": 1.5}, "poison_rate"),
    ({"mesa.betas": [0.5, 1.2]}, "betas"),
    ({"amp": "maybe"}, "amp"),
    ({"hp_seeds": 0}, "hp_seeds must be 1 or more"),
])
def test_bad_overrides_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config("smoke", **overrides)


def test_cuda_without_cuda_is_a_clear_error():
    import torch
    from mesa_utils.train import get_device
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        get_device("cuda")
    assert get_device("auto").type == "cpu"
