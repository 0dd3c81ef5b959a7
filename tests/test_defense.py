"""Defence pieces: retraining keeps labels, the baseline and Neural Cleanse reverse a known
backdoor, the MAD anomaly index flags a planted outlier, ASR counts the right images."""
import pytest
import torch

from mesa_utils.config import BaselineConfig, NeuralCleanseConfig, TrainConfig
from mesa_utils.defense import MaskSource, anomaly_index, neural_cleanse, reverse_triggers
from mesa_utils.train import fit
from mesa_utils.triggers import TriggerPaster
from tests.conftest import BrightPatchModel, make_splits


@pytest.fixture
def seen_labels(monkeypatch):
    """Every label batch that reaches the training loss."""
    seen = []
    original_loss = torch.nn.functional.cross_entropy

    def spy(logits, labels, **kwargs):
        seen.append(labels.clone())
        return original_loss(logits, labels, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    return seen


def test_retraining_keeps_true_labels_and_the_data_untouched(toy_ctx, seen_labels):
    toy_ctx.splits = make_splits(n=32, label=2)
    images_before = toy_ctx.splits.defense_images.clone()
    history = fit(toy_ctx, toy_ctx.new_classifier(), toy_ctx.splits.defense_images,
                  toy_ctx.splits.defense_labels, TrainConfig(epochs=2, batch_size=8,
                                                             poison_rate=0.5),
                  "defense", source=TriggerPaster(torch.ones(3, 3, 3)), target=None)
    assert sum(h["poisoned"] for h in history) > 0          # triggers were pasted ...
    assert seen_labels and all((labels == 2).all() for labels in seen_labels)  # no relabel
    assert torch.equal(toy_ctx.splits.defense_images, images_before)


def test_attack_fit_relabels_poisoned_images(toy_ctx, seen_labels):
    toy_ctx.splits = make_splits(n=32, label=2)
    fit(toy_ctx, toy_ctx.new_classifier(), toy_ctx.splits.train_images, toy_ctx.splits.train_labels,
        TrainConfig(epochs=1, batch_size=8, poison_rate=1.0), "attack",
        source=TriggerPaster(torch.ones(3, 3, 3)), target=0)
    assert seen_labels and all((labels == 0).all() for labels in seen_labels)


def test_baseline_reverses_a_valid_trigger(toy_ctx):
    triggers = reverse_triggers(toy_ctx, BrightPatchModel(), 0,
                                BaselineConfig(starts=4, steps=40, lr=0.5, batch_size=16),
                                toy_ctx.splits.defense_images)
    assert triggers.shape == (4, 3, 3, 3) and 0 <= triggers.min() and triggers.max() <= 1
    valid = BrightPatchModel().valid_brightness(0.9)
    assert (triggers.flatten(1).mean(1) > valid).all()    # bright = valid for this model
    starts = reverse_triggers(toy_ctx, BrightPatchModel(), 0, BaselineConfig(starts=4, steps=0),
                              toy_ctx.splits.defense_images)
    assert not torch.allclose(starts[0], starts[1])       # independent random starts


def test_anomaly_index_flags_a_planted_outlier():
    norms = torch.tensor([40.0, 41, 39, 40.5, 39.5, 40, 40, 5, 41, 39])
    index = anomaly_index(norms)
    assert int(index.argmax()) == 7 and index[7] > 2
    assert (index[torch.arange(10) != 7] < 2).all()


def test_neural_cleanse_finds_a_small_mask_only_for_the_backdoored_class(toy_ctx):
    cfg = NeuralCleanseConfig(steps=150, batch_size=8, check_every=5, patience=2, lr=0.1)
    toy_ctx.splits = make_splits(n=64, num_classes=3, label=2)
    result = neural_cleanse(toy_ctx, BrightPatchModel(num_classes=3, target=0), cfg,
                            toy_ctx.splits.defense_images)
    assert result["masks"].shape == (3, 1, 32, 32) and result["patterns"].shape == (3, 3, 32, 32)
    assert bool(result["reached"][0])
    assert result["l1"][0] < 30                  # a few bright pixels are enough for class 0
    source = MaskSource(result["masks"][0], result["patterns"][0])
    x = torch.zeros(4, 3, 32, 32)
    assert (BrightPatchModel()(source(x)).argmax(1) == 0).all()


def test_asr_without_non_target_images_is_a_clear_error(toy_ctx):
    from mesa_utils.train import attack_success_rate
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="no image outside the target class 0"):
        attack_success_rate(toy_ctx, BrightPatchModel(), toy_ctx.splits.eval_images[:4], labels,
                            TriggerPaster(torch.ones(3, 3, 3)), target=0)


def test_asr_counts_only_images_outside_the_target_class(toy_ctx):
    from mesa_utils.train import attack_success_rate
    # The three target-class images are white, so the toy model predicts the target on them
    # whatever is pasted; the three others are black and a grey trigger does not fire.
    images = torch.cat([torch.full((3, 32, 32, 3), 255, dtype=torch.uint8),
                        torch.zeros(3, 32, 32, 3, dtype=torch.uint8)])
    labels = torch.tensor([0, 0, 0, 2, 2, 1])
    grey, white = (TriggerPaster(torch.full((3, 3, 3), v)) for v in (0.5, 1.0))
    assert attack_success_rate(toy_ctx, BrightPatchModel(), images, labels, grey, 0) == 0.0
    assert attack_success_rate(toy_ctx, BrightPatchModel(), images, labels, white, 0) == 1.0


def test_random_patch_control_pastes_a_fresh_random_patch_per_image():
    from mesa_utils.triggers import RandomPatchSource
    grey = torch.full((64, 3, 32, 32), 0.5)
    out = RandomPatchSource((3, 3))(grey, torch.Generator().manual_seed(0))
    changed = (out != grey).any(1)                           # (64, 32, 32) pixels touched
    assert changed.flatten(1).sum(1).le(9).all()             # at most one 3x3 patch each
    corners = [tuple(c.nonzero().min(0).values.tolist()) for c in changed]
    assert len(set(corners)) > 32                            # positions vary per image
    patches = torch.stack([out[i, :, r:r + 3, c:c + 3] for i, (r, c) in enumerate(corners)])
    assert patches.flatten(1).unique(dim=0).shape[0] == 64   # a new pattern per image
    assert 0.4 < patches.mean() < 0.6 and patches.std() > 0.25   # uniform on [0, 1)


def test_finetune_control_pastes_nothing(toy_ctx):
    toy_ctx.splits = make_splits(n=32, label=2)
    history = fit(toy_ctx, toy_ctx.new_classifier(), toy_ctx.splits.defense_images,
                  toy_ctx.splits.defense_labels, TrainConfig(epochs=1, batch_size=8,
                                                             poison_rate=0.5), "defense",
                  source=None, target=None)
    assert sum(h["poisoned"] for h in history) == 0


def test_every_defence_source_and_both_controls_are_compared(toy_ctx, monkeypatch):
    """defense_sources lists each method once per trigger (baseline once per start), with the
    controls: finetune without any source, random_patch with random patches."""
    from types import SimpleNamespace

    import mesa_utils.defense as defense
    from mesa_utils.mesa import Member
    from mesa_utils.triggers import RandomPatchSource
    members = [Member(beta=b, alpha=0.1, target=0, seed=0) for b in (0.5, 0.9)]
    bank = SimpleNamespace(members=members, key="bank", sampler=lambda chosen=None: "sampler",
                           entropy_sampler=lambda: SimpleNamespace(weights=torch.ones(2) / 2))
    monkeypatch.setattr(defense, "staircase_bank", lambda ctx, backdoor: bank)
    monkeypatch.setattr(defense, "baseline_triggers", lambda ctx, b: torch.rand(2, 3, 3, 3))
    monkeypatch.setattr(defense, "neural_cleanse_result", lambda ctx, b: {
        "masks": torch.zeros(3, 1, 32, 32), "patterns": torch.zeros(3, 3, 32, 32)})
    backdoor = SimpleNamespace(trigger=170, target=0, key="k", source=lambda: "original")
    runs = defense.defense_sources(toy_ctx, backdoor)
    methods = [r.method for r in runs]
    assert methods == ["mesa", "mesa", "mesa_mixture", "mesa_entropy_mixture", "baseline",
                       "baseline", "neural_cleanse", "neural_cleanse_crop", "ideal", "finetune",
                       "random_patch"]
    finetune, random_patch = runs[-2], runs[-1]
    assert finetune.source is None and finetune.spec == {"kind": "none"}
    assert isinstance(random_patch.source, RandomPatchSource)
    assert random_patch.spec["kind"] == "random_patch"
    assert [r.beta for r in runs[:2]] == [0.5, 0.9] and [r.start for r in runs[4:6]] == [0, 1]
    assert len({str(r.spec) for r in runs}) == len(runs)     # every retraining keyed apart


def test_every_method_but_the_baseline_is_retrained_from_each_seed(toy_ctx, monkeypatch):
    """compare_defenses: defense_seeds runs (seeds seed, seed + 1, ...) for every method, one
    per start for the baseline, each retraining keyed by its own seed."""
    from dataclasses import replace
    from types import SimpleNamespace

    import mesa_utils.defense as defense
    ctx = replace(toy_ctx, cfg=replace(toy_ctx.cfg, seed=5, defense_seeds=3))
    sources = [defense.Retraining("mesa", "s", {"kind": "mesa"}, beta=0.9),
               defense.Retraining("baseline", "s", {"b": 0}, start=0),
               defense.Retraining("baseline", "s", {"b": 1}, start=1),
               defense.Retraining("finetune", None, {"kind": "none"})]
    monkeypatch.setattr(defense, "defense_sources", lambda ctx, backdoor, methods: sources)
    trained = []

    def fake_retrain_many(ctx, backdoor, runs, holdout=0):
        trained.extend((str(spec), seed) for _, spec, seed, _ in runs)
        return [{"asr": 0.05 + seed / 100, "clean_accuracy": 0.8} for _, _, seed, _ in runs]
    monkeypatch.setattr(defense, "retrain_many", fake_retrain_many)
    backdoor = SimpleNamespace(trigger=170, target=0, asr=0.99, clean_accuracy=0.8)
    rows = defense.compare_defenses(ctx, backdoor)
    runs = [(r["method"], r["start"], r["seed"]) for r in rows]
    assert runs == [("mesa", None, 5), ("mesa", None, 6), ("mesa", None, 7),
                    ("baseline", 0, 5), ("baseline", 1, 5),
                    ("finetune", None, 5), ("finetune", None, 6), ("finetune", None, 7)]
    assert len(set(trained)) == len(trained)                 # no retraining twice
    assert [r["asr_after"] for r in rows[:3]] == pytest.approx([0.10, 0.11, 0.12])
    assert all(r["asr_after_low"] < r["asr_after"] < r["asr_after_high"] for r in rows)


def test_neural_cleanse_crop_cuts_the_mask_box_and_pastes_it_anywhere():
    from mesa_utils.defense import MaskedPatchPaster, crop_to_mask
    mask = torch.zeros(1, 32, 32)
    mask[0, 5, 7], mask[0, 7, 9], mask[0, 6, 8] = 1.0, 0.6, 0.3    # box rows 5-7, cols 7-9
    mask[0, 20, 20] = 0.4                                            # below the threshold
    pattern = torch.rand(3, 32, 32)
    crop_mask, crop_pattern = crop_to_mask(mask, pattern)
    assert crop_mask.shape == (1, 3, 3) and crop_pattern.shape == (3, 3, 3)
    assert torch.equal(crop_mask, mask[:, 5:8, 7:10])
    assert torch.equal(crop_pattern, pattern[:, 5:8, 7:10])
    faint = torch.full((1, 32, 32), 0.1)
    faint[0, 3, 4] = 0.2                                             # none reaches 0.5
    assert crop_to_mask(faint, pattern)[0].shape == (1, 1, 1)        # its largest pixel
    grey = torch.full((200, 3, 32, 32), 0.5)
    out = MaskedPatchPaster(crop_mask, crop_pattern)(grey, torch.Generator().manual_seed(0))
    changed = (out != grey).any(1)
    corners = {tuple(c.nonzero().min(0).values.tolist()) for c in changed}
    assert len(corners) > 100                                        # anywhere, per image
    r, c = next(iter(changed)).nonzero().min(0).values.tolist()
    window = out[0, :, r:r + 3, c:c + 3]
    assert torch.allclose(window, (1 - crop_mask) * 0.5 + crop_mask * crop_pattern)
    assert changed.flatten(1).sum(1).le(3).all()                     # only the 3 masked pixels
