"""K retrainings as one banked network (models.ResNetBank, train.fit_bank, defense.retrain_many)
give what K lone runs give. Compared in float64, where the two summation orders agree to
~1e-15: in float32 a few badly conditioned steps (batch norm over a near-constant channel)
amplify rounding differences of 1e-7 to 1e-3 within a dozen steps, in the bank and between two
lone runs on different hardware alike."""
import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import mesa_utils.data as data
import mesa_utils.train as train
from mesa_utils.config import HOW_FIELDS, TrainConfig, make_config
from mesa_utils.data import STATS, Splits
from mesa_utils.defense import retrain_many
from mesa_utils.models import ResNet18, ResNetBank
from mesa_utils.store import Store
from mesa_utils.train import Context, fit, fit_bank
from mesa_utils.triggers import RandomPatchSource, TriggerPaster


def resnet(width=4, seed=0, dtype=torch.float64, classes=10):
    torch.manual_seed(seed)
    return ResNet18(classes, width, *STATS["cifar10"]).to(dtype)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def test_a_bank_computes_each_member_on_its_own_slice():
    models = [resnet(seed=s) for s in range(3)]
    bank = ResNetBank(copy.deepcopy(models))
    x = torch.rand(3, 6, 3, 32, 32, dtype=torch.float64)
    for mode in ("train", "eval"):       # batch statistics, then running statistics
        for m in (*models, bank):
            m.train(mode == "train")
        expected = torch.stack([m(x[i]) for i, m in enumerate(models)])
        out = bank(x)       # once: a train-mode pass moves the running statistics
        assert out.shape == (3, 6, 10) and torch.allclose(out, expected, atol=1e-12)
    for i, model in enumerate(models):   # the train-mode passes moved each member's statistics
        assert max_difference(bank.member_state_dict(i), model.state_dict()) < 1e-12
        ResNet18(10, 4, *STATS["cifar10"]).load_state_dict(bank.member_state_dict(i))


def test_a_bank_refuses_models_of_different_architectures():
    with pytest.raises(ValueError, match="model 1 of the bank has another architecture"):
        ResNetBank([resnet(width=4), resnet(width=8)])
    odd = [resnet(), resnet()]
    for model in odd:                    # a layer the bank cannot group by member
        model.blocks[0].shortcut = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="cannot bank a Linear: only Conv2d and BatchNorm2d"):
        ResNetBank(odd)


@pytest.fixture
def float64_ctx(tmp_path, monkeypatch):
    """Varied images and labels of 10 classes in every split, pixels in float64 (the uint8 ->
    pixel conversion patched where the loader and the metrics call it)."""
    def float64_pixels(images):
        return images.permute(0, 3, 1, 2).double().div_(255)
    monkeypatch.setattr(data, "to_pixels", float64_pixels)
    monkeypatch.setattr(train, "to_pixels", float64_pixels)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    splits = Splits("toy", [str(c) for c in range(10)], images, labels, images, labels, images,
                    labels, fingerprint="toy")
    cfg = make_config("smoke", device="cpu", amp="off")
    cfg = replace(cfg, defense=replace(cfg.defense, batch_size=16, poison_rate=0.5))
    return Context(cfg, splits, torch.device("cpu"), None, Store(tmp_path / "store"))


def test_fit_bank_trains_each_member_as_fit_trains_it_alone(float64_ctx):
    ctx = float64_ctx
    images, labels = ctx.splits.defense_images, ctx.splits.defense_labels
    recipe = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4,
                         label_smoothing=0.1, poison_rate=0.3)
    sources = [None, TriggerPaster(torch.ones(3, 3, 3)), RandomPatchSource((3, 3))]
    seeds = [0, 1, 2]
    base = resnet()
    alone = []
    for source, seed in zip(sources, seeds):
        model = copy.deepcopy(base)
        history = fit(ctx, model, images, labels, recipe, "defense", source=source, seed=seed)
        alone.append((model, history))
    bank = ResNetBank([copy.deepcopy(base) for _ in seeds])
    histories = fit_bank(ctx, bank, images, labels, recipe, "defense", sources, seeds)
    for i, (model, history) in enumerate(alone):
        assert [h["poisoned"] for h in histories[i]] == [h["poisoned"] for h in history]
        assert [h["poisoned"] for h in history] != [0, 0] or sources[i] is None
        assert [h["loss"] for h in histories[i]] == pytest.approx([h["loss"] for h in history],
                                                                  abs=1e-10)
        assert max_difference(bank.member_state_dict(i), model.state_dict()) < 1e-10
    # 8 steps moved the weights far more than the tolerance: the comparison can fail
    assert max_difference(alone[0][0].state_dict(), base.state_dict()) > 1e-3
    with pytest.raises(ValueError, match="a bank of 3 models needs 3 sources and seeds"):
        fit_bank(ctx, bank, images, labels, recipe, "defense", sources[:2], seeds[:2])


def test_retrain_many_banked_stores_what_the_lone_runs_store(float64_ctx):
    """Three retrainings one after another and as one bank: in float64 the same histories,
    metrics and weights, under keys of their own (in float32 they part); a second call reads
    them back."""
    base = resnet()
    trigger = TriggerPaster(torch.ones(3, 3, 3))
    backdoor = SimpleNamespace(key="toy-backdoor", trigger=170, target=0,
                               model=lambda ctx: copy.deepcopy(base), source=lambda: trigger)
    runs = [(None, {"kind": "none"}, 0, "finetune"), (trigger, {"kind": "patch"}, 0, "patch"),
            (trigger, {"kind": "patch"}, 1, "patch, seed 1")]
    records, keys = {}, {}
    for bank_size in (1, 3):
        ctx = replace(float64_ctx, cfg=replace(float64_ctx.cfg, retrain_bank=bank_size),
                      store=Store(float64_ctx.store.root / f"bank{bank_size}"))
        records[bank_size] = retrain_many(ctx, backdoor, runs)
        keys[bank_size] = sorted(p.name for p in (ctx.store.root / "defense").glob("*.pt"))
        again = retrain_many(ctx, backdoor, runs)
        assert [r["asr"] for r in again] == [r["asr"] for r in records[bank_size]]
    assert len(keys[1]) == len(keys[3]) == 3 and not set(keys[1]) & set(keys[3])
    for lone, banked in zip(records[1], records[3]):
        for banked_epoch, lone_epoch in zip(banked["history"], lone["history"]):
            assert banked_epoch == pytest.approx(lone_epoch, abs=1e-10)
        assert banked["asr"] == lone["asr"] and banked["clean_accuracy"] == lone["clean_accuracy"]
        assert max_difference(banked["state_dict"], lone["state_dict"]) < 1e-10
    assert records[1][1]["history"][0]["poisoned"] > 0
    assert max_difference(records[1][0]["state_dict"], base.state_dict()) > 1e-3


def test_a_retrain_bank_names_its_own_results():
    """A bank size is checked like any count; its results (float32 members part from the lone
    runs) go to other unit files and another output folder than the profile's."""
    from mesa_utils.outputs import output_folder, overridden_fields
    from mesa_utils.units import DEFENCE, config_key
    with pytest.raises(ValueError, match="retrain_bank must be an integer >= 1"):
        make_config("quick", retrain_bank=0)
    banked = make_config("quick", retrain_bank=8)
    assert config_key(banked, DEFENCE) != config_key(make_config("quick"), DEFENCE)
    assert output_folder(banked) != "quick" and overridden_fields(banked) == {"retrain_bank": 8}
    assert "retrain_bank" not in HOW_FIELDS
    assert config_key(make_config("quick", defense_seeds=2), DEFENCE) != \
        config_key(make_config("quick"), DEFENCE)
