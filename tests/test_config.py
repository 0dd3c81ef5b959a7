import dataclasses

import pytest

from mesa_utils.config import PROFILES, RULES, Config, make_config, notebook_config, validate


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
    ({"study.seeds": 0}, "study.seeds must be 1 or more"),
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


# --- validation of every field ---------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


INVALID = [
    # the cases a user found accepted, or crashing late
    ({"mesa.steps": 0}, "mesa.steps must be an integer >= 1, got 0"),
    ({"mesa.batch_size": 0}, "mesa.batch_size must be an integer >= 2, got 0"),
    ({"attack.lr": -0.1}, "attack.lr must be > 0 and finite, got -0.1"),
    ({"triggers": []}, "triggers must be a non-empty tuple of distinct values, each a "
                       "trigger id (an integer in [0, 2^63 - 1]), got ()"),
    ({"triggers": [-1]}, "triggers[0] must be a trigger id (an integer in [0, 2^63 - 1]), got -1"),
    ({"trigger_set": "colour"}, "trigger_set must be one of 'black_white', 'random_colour', "
                                "'black_white_2x2', "),
    ({"triggers": [170, 170]}, "got (170, 170): 170 repeats"),
    ({"study.beta": 1.0}, "study.beta must be in (0, 1), got 1.0"),
    ({"detection.threshold": 1.5}, "detection.threshold must be in (0, 1), got 1.5"),
    ({"study.samples": 1}, "study.samples must be an integer >= 2, got 1"),
    # top level
    ({"dataset": "mnist"}, "dataset must be one of 'cifar10', 'cifar100', got 'mnist'"),
    ({"train_subset": 50001}, "train_subset must be an integer in [0, 50000], got 50001"),
    ({"test_subset": -1}, "test_subset must be an integer in [0, 10000], got -1"),
    ({"eval_size": 0}, "eval_size must be an integer >= 1, got 0"),
    ({"eval_size": 768}, "eval_size must be an integer in [1, 767] (below the test set size "
                         "768), got 768"),
    ({"width": 0}, "width must be an integer >= 8, got 0"),
    ({"target": -1}, "target must be an integer >= 0, got -1"),
    ({"target": 10}, "target must be an integer in [0, 9], got 10"),
    ({"dataset": "cifar100", "target": 100}, "target must be an integer in [0, 99], got 100"),
    ({"triggers": [170, 999]}, "triggers[1] must be a canonical trigger id (one of the 51 in "
                               "triggers.BW_TRIGGER_IDS) with trigger_set 'black_white', got 999"),
    ({"triggers": [170, 511]}, "got 511: trigger id 511 is not one of the 51 canonical ids; "
                               "it is the same trigger as 0"),
    ({"visualization.triggers": [6]}, "visualization.triggers[0] must be a canonical trigger id"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"device": "gpu!"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU's index), "
                         "got 'gpu!'"),
    ({"device": ""}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"amp": "maybe"}, "amp must be one of 'auto', 'on', 'off', got 'maybe'"),
    ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1, got 0"),
    ({"detection.threshold": 0.0}, "detection.threshold must be in (0, 1), got 0.0"),
    ({"detection.threshold": NAN}, "detection.threshold must be in (0, 1), got nan"),
    ({"detection.beta": 1.0}, "detection.beta must be in (0, 1), got 1.0"),
    ({"study.trigger": 511}, "study.trigger must be a canonical trigger id"),
    ({"study.alphas": []}, "study.alphas must be a non-empty tuple of distinct values, each "
                        ">= 0 and finite, got ()"),
    ({"study.alphas": [0.1, -1.0]}, "study.alphas[1] must be >= 0 and finite, got -1.0"),
    ({"study.alphas": [INF]}, "study.alphas[0] must be >= 0 and finite, got inf"),
    ({"study.beta": 0.0}, "study.beta must be in (0, 1), got 0.0"),
    ({"visualization.triggers": [170, 170]}, "visualization.triggers must be a tuple of "
                                             "distinct values, each a trigger id"),
    ({"visualization.triggers": [186]}, "visualization.triggers must be among triggers "
                                        "(170, 0) (or () for all of them), got (186,): 186 is "
                                        "not attacked in this run"),
    ({"visualization.samples": 1}, "visualization.samples must be an integer >= 2, got 1"),
    # TrainConfig sections
    ({"clean.epochs": 0}, "clean.epochs must be an integer >= 1, got 0"),
    ({"defense.batch_size": 0}, "defense.batch_size must be an integer >= 1, got 0"),
    ({"attack.lr": NAN}, "attack.lr must be > 0 and finite, got nan"),
    ({"attack.lr": INF}, "attack.lr must be > 0 and finite, got inf"),
    ({"attack.momentum": 1.0}, "attack.momentum must be in [0, 1), got 1.0"),
    ({"defense.momentum": NAN}, "defense.momentum must be in [0, 1), got nan"),
    ({"attack.nesterov": True, "attack.momentum": 0.0},
     "attack.nesterov=True needs attack.momentum > 0"),
    ({"clean.weight_decay": -5e-4}, "clean.weight_decay must be >= 0 and finite, got -0.0005"),
    ({"attack.schedule": "cosine"}, "attack.schedule must be one of 'constant', 'onecycle', "
                                    "got 'cosine'"),
    ({"clean.label_smoothing": 1.0}, "clean.label_smoothing must be in [0, 1), got 1.0"),
    ({"defense.poison_rate": 1.5}, "defense.poison_rate must be in [0, 1], got 1.5"),
    ({"clean.poison_rate": 0.1}, "clean.poison_rate must be 0 (clean training never poisons)"
                                 ", got 0.1"),
    ({"attack.poison_rate": 0.0}, "attack.poison_rate must be in (0, 1]"),
    # MesaConfig sections
    ({"detection.steps": 0}, "detection.steps must be an integer >= 1, got 0"),
    ({"mesa.batch_size": 1}, "mesa.batch_size must be an integer >= 2, got 1 (the "
                             "generator's BatchNorm"),
    ({"mesa.lr": NAN}, "mesa.lr must be > 0 and finite, got nan"),
    ({"mesa.adam_betas": [0.5]}, "mesa.adam_betas must be a tuple of exactly 2 values, each "
                                 "in [0, 1), got (0.5,)"),
    ({"mesa.adam_betas": [0.5, 1.0]}, "mesa.adam_betas[1] must be in [0, 1), got 1.0"),
    ({"mesa.alpha": -0.1}, "mesa.alpha must be >= 0 and finite, got -0.1"),
    ({"mesa.betas": []}, "mesa.betas must be a non-empty tuple of distinct values, each in "
                         "(0, 1), got ()"),
    ({"mesa.betas": [0.5, 0.8, 0.5]}, "got (0.5, 0.8, 0.5): 0.5 repeats"),
    ({"mesa.noise_dim": 6}, "mesa.noise_dim must be an integer >= 4 and divisible by 4, got 6"),
    ({"mesa.noise_dim": 0}, "mesa.noise_dim must be an integer >= 4 and divisible by 4, got 0"),
    ({"mesa.hidden": 0}, "mesa.hidden must be an integer >= 1, got 0"),
    ({"mesa.trigger_noise": -0.1}, "mesa.trigger_noise must be >= 0 and finite, got -0.1"),
    ({"mesa.mine_ema_rate": 0.0}, "mesa.mine_ema_rate must be in (0, 1], got 0.0"),
    ({"mesa.eval_samples": 1}, "mesa.eval_samples must be an integer >= 2, got 1"),
    ({"mesa.mine_ema_rate": 0.01}, "mesa.mine_ema_rate must be >= 0.393 for mesa.steps = 6, "
                                   "got 0.01: MINE's moving average would still weight its "
                                   "first value by 94% at the end of training"),
    ({"detection.steps": 300, "detection.mine_ema_rate": 0.001},   # quick's old setting
     "detection.mine_ema_rate must be >= 0.00994 for detection.steps = 300, got 0.001: "
     "MINE's moving average would still weight its first value by 74%"),
    ({"study.neighbours": 64}, "study.neighbours must be an integer in [1, 63] (below "
                               "study.samples), got 64"),
    ({"study.validity_images": 0}, "study.validity_images must be an integer >= 1, got 0"),
    ({"study.validity_samples": 0}, "study.validity_samples must be an integer >= 1, got 0"),
    ({"study.alphas": [0.0, 10.0]}, "study.alphas must include mesa.alpha (0.1), the reference"),
    # baseline and Neural Cleanse
    ({"baseline.starts": 0}, "baseline.starts must be an integer >= 1, got 0"),
    ({"baseline.steps": 0}, "baseline.steps must be an integer >= 1, got 0"),
    ({"baseline.lr": 0.0}, "baseline.lr must be > 0 and finite, got 0.0"),
    ({"baseline.momentum": -0.1}, "baseline.momentum must be in [0, 1), got -0.1"),
    ({"baseline.batch_size": 0}, "baseline.batch_size must be an integer >= 1, got 0"),
    ({"neural_cleanse.steps": 0}, "neural_cleanse.steps must be an integer >= 1, got 0"),
    ({"neural_cleanse.batch_size": 0}, "neural_cleanse.batch_size must be an integer >= 1"),
    ({"neural_cleanse.lr": INF}, "neural_cleanse.lr must be > 0 and finite, got inf"),
    ({"neural_cleanse.init_cost": -1e-3}, "neural_cleanse.init_cost must be >= 0 and finite"),
    ({"neural_cleanse.cost_multiplier": 1.0}, "neural_cleanse.cost_multiplier must be > 1 and "
                                              "finite, got 1.0"),
    ({"neural_cleanse.patience": 0}, "neural_cleanse.patience must be an integer >= 1, got 0"),
    ({"neural_cleanse.check_every": 0}, "neural_cleanse.check_every must be an integer >= 1"),
    ({"neural_cleanse.asr_threshold": 0.0}, "neural_cleanse.asr_threshold must be in (0, 1], "
                                            "got 0.0"),
    ({"neural_cleanse.anomaly_threshold": 0.0}, "neural_cleanse.anomaly_threshold must be > 0 "
                                                "and finite, got 0.0"),
    # Blended and SampDetox
    ({"blended.ratio": 0.0}, "blended.ratio must be in (0, 1), got 0.0"),
    ({"blended.ratio": 1.0}, "blended.ratio must be in (0, 1), got 1.0"),
    ({"sampdetox.t1": 200}, "sampdetox.t1 <= sampdetox.t2 <= sampdetox.timesteps is needed"),
    ({"sampdetox.t2": 1001}, "got t1=20, t2=1001, timesteps=1000"),
    ({"sampdetox.max_train_timestep": 100}, "sampdetox.max_train_timestep must be an integer "
                                            "in [120, 1000]"),
    ({"sampdetox.channels": [8]}, "sampdetox.channels must hold 2 to 6 widths"),
    ({"sampdetox.channels": [8] * 7}, "sampdetox.channels must hold 2 to 6 widths"),
    ({"sampdetox.eval_images": 257}, "sampdetox.eval_images must be an integer in [0, 256]"),
    ({"sampdetox.ema_decay": 1.0}, "sampdetox.ema_decay must be in [0, 1), got 1.0"),
    # beyond int64 (no tensor, seed or float holds it): refused, whatever the field's bound
    ({"seed": 2 ** 64}, "seed must be an integer >= 0, got 18446744073709551616"),
    ({"width": 10 ** 400}, "width must be an integer >= 8"),
    ({"mesa.lr": 10 ** 400}, "mesa.lr must be a finite number, got 1000"),
    ({"trigger_set": "random_colour", "triggers": (2 ** 64,)},
     "triggers[0] must be a trigger id (an integer in [0, 2^63 - 1])"),
    ({"device": "meta"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "mps"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
]


@pytest.mark.parametrize("overrides, message", INVALID,
                         ids=[",".join(overrides) for overrides, _ in INVALID])
def test_invalid_values_name_the_field_and_its_range(overrides, message):
    with pytest.raises(ValueError) as error:
        make_config("smoke", **overrides)
    assert message in str(error.value)


def test_configs_built_directly_reject_bools_and_lists():
    # make_config's overrides are type-checked by _replace; a Config built in code is not
    cfg = make_config("smoke")
    for broken, message in [
        (dataclasses.replace(cfg, width=True), "width must be an integer >= 8, got True"),
        (dataclasses.replace(cfg, mesa=dataclasses.replace(cfg.mesa, steps=True)),
         "mesa.steps must be an integer >= 1, got True"),
        (dataclasses.replace(cfg, triggers=[170]), "triggers must be a non-empty tuple"),
        (dataclasses.replace(cfg, save_retrained=1), "save_retrained must be True or False"),
        (dataclasses.replace(cfg, profile="fast"), "profile must be one of 'smoke', 'quick', "
                                                   "'paper', got 'fast'"),
        (dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, beta="0.8")),
         "study.beta must be in (0, 1), got '0.8'"),
    ]:
        with pytest.raises(ValueError) as error:
            validate(broken)
        assert message in str(error.value)


def _leaf_fields(cls, prefix=""):
    """(dotted name, owning dataclass, field name) of every non-dataclass field, recursively."""
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            yield from _leaf_fields(field.type, prefix + field.name + ".")
        else:
            yield prefix + field.name, cls, field.name


def test_every_config_field_has_a_rule():
    # Every field has a rule in RULES (no field is left to the checks across fields alone), so
    # a field added without one fails here; a rule whose field was renamed fails too.
    leaves = list(_leaf_fields(Config))
    missing = [name for name, owner, field in leaves if field not in RULES.get(owner, {})]
    assert not missing, f"config fields without a validation rule: {missing}"
    for owner, rules in RULES.items():
        names = {field.name for field in dataclasses.fields(owner)}
        assert set(rules) <= names, f"rules for no field of {owner.__name__}: " \
                                    f"{sorted(set(rules) - names)}"
    names = {name for name, _, _ in leaves}
    assert {"seed", "attack.lr", "detection.beta", "mesa.steps", "study.seeds",
            "visualization.triggers", "neural_cleanse.patience"} <= names
    assert not names & {"clean", "mesa", "baseline"}     # sections are walked, not leaves


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_passes_every_rule(profile):
    cfg = make_config(profile)
    validate(cfg)
    for name, owner, field in _leaf_fields(Config):
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        RULES[owner][field].check(name, value)


@pytest.mark.parametrize("overrides", [
    {"defense.poison_rate": 0.0},       # retraining without triggers: a control
    {"attack.poison_rate": 1.0, "clean.momentum": 0.0, "attack.momentum": 0.0},
    {"device": "cuda:1"},               # whether CUDA exists is checked when it is used
    {"dataset": "cifar100", "target": 99, "train_subset": 50000, "test_subset": 0},
    {"mesa.noise_dim": 4, "mesa.batch_size": 2, "study.samples": 2, "study.neighbours": 1,
     "study.alphas": [0], "mesa.alpha": 0.0},
    {"mesa.mine_ema_rate": 1.0, "neural_cleanse.asr_threshold": 1.0, "mesa.alpha": 0.0},
    {"eval_size": 767, "seed": 0, "mesa.adam_betas": [0, 0.999]},
    {"visualization.triggers": [], "visualization.samples": 2},     # () = every trigger
    {"sampdetox.t1": 120, "sampdetox.max_train_timestep": 120, "sampdetox.eval_images": 256},
    {"sampdetox.t1": 1, "sampdetox.t2": 1000, "sampdetox.max_train_timestep": 1000,
     "sampdetox.channels": [8] * 6, "sampdetox.eval_images": 0},
    # random-colour triggers are numbered: any integer >= 0, canonical or not
    {"trigger_set": "random_colour", "triggers": [0, 6, 511, 10 ** 6], "study.trigger": 3,
     "visualization.triggers": [6]},
])
def test_values_at_the_limits_are_accepted(overrides):
    make_config("smoke", **overrides)


def test_overrides_that_are_no_mapping_or_name_the_profile_are_clear_errors():
    with pytest.raises(ValueError, match="profile is not an override: choose it with"):
        make_config("smoke", profile="quick")
    with pytest.raises(ValueError, match="profile is not an override"):
        notebook_config("smoke", {"profile": "quick"})
    for overrides in ('{"mesa.steps": 5}', [1, 2]):        # -p overrides '{...}', -y '[1, 2]'
        with pytest.raises(ValueError, match="overrides must be a mapping of config fields"):
            notebook_config("smoke", overrides)
    assert make_config("smoke", device="cuda:1").device == "cuda:1"   # built anywhere


def test_notebook_parameters_and_overrides_combine_and_never_collide_silently():
    cfg = notebook_config("smoke", {"mesa.steps": 7}, triggers=[170], target=None, seed=2)
    assert cfg.triggers == (170,) and cfg.seed == 2 and cfg.mesa.steps == 7 and cfg.target == 0
    # a parameter left at None may come from overrides instead
    assert notebook_config("smoke", {"seed": 3}, seed=None).seed == 3
    with pytest.raises(ValueError, match="triggers given both as a notebook parameter and "
                                         "inside overrides; give each once"):
        notebook_config("smoke", {"triggers": [0]}, triggers=[170])
