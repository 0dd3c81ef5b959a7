import pytest
import torch

from mesa_utils.triggers import (BW_TRIGGER_IDS, BlendedTrigger, TriggerPaster, apply_trigger,
                                 black_white_triggers, blend_pattern, check_trigger_ids,
                                 pattern_from_id, poison, random_colour_trigger, symmetry_class,
                                 trigger_from_id, trigger_pattern)

# The smallest members of the 51 classes, as listed from the authors' code.
AUTHORS_IDS = [0, 1, 2, 3, 5, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 23, 26, 27, 28, 29,
               30, 40, 41, 42, 43, 45, 56, 57, 58, 59, 61, 68, 69, 70, 78, 84, 85, 86, 94, 97,
               98, 99, 101, 106, 108, 113, 114, 170, 186]


def test_enumeration_gives_the_authors_51_ids():
    assert list(BW_TRIGGER_IDS) == AUTHORS_IDS


def test_symmetry_classes_partition_the_512_patterns():
    classes = {symmetry_class(i) for i in range(512)}
    assert len(classes) == 51
    assert sorted(i for c in classes for i in c) == list(range(512))
    assert {len(c) for c in classes} <= {2, 4, 8, 16}   # inversion never fixes a pattern
    assert sorted(c[0] for c in classes) == AUTHORS_IDS


def test_symmetry_class_is_closed_under_rotation_flip_and_inversion():
    members = set(symmetry_class(170))
    assert members == {170, 341}            # 010101010 and its inversion 101010101
    for i in symmetry_class(11):
        p = pattern_from_id(i)
        for q in (torch.rot90(p), p.flip(0), p.flip(1), 1 - p):
            assert int(sum(int(b) << (8 - k) for k, b in enumerate(q.flatten().tolist()))) in \
                set(symmetry_class(11))


def test_black_white_triggers_shape_values_and_order():
    triggers = black_white_triggers()
    assert triggers.shape == (51, 3, 3, 3) and triggers.dtype == torch.float32
    assert set(triggers.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(triggers[BW_TRIGGER_IDS.index(170)][0],
                       torch.tensor([[0., 1, 0], [1, 0, 1], [0, 1, 0]]))
    assert torch.equal(triggers[1], trigger_from_id(BW_TRIGGER_IDS[1]))
    assert (triggers[:, 0] == triggers[:, 1]).all() and (triggers[:, 1] == triggers[:, 2]).all()


@pytest.mark.parametrize("bad", [-1, 512, 1.5, "170", True, None])
def test_unknown_trigger_id_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown trigger id"):
        trigger_from_id(bad)


def test_non_canonical_id_names_its_canonical_form():
    with pytest.raises(ValueError, match="same trigger as 0"):
        check_trigger_ids([511])


def test_random_colour_triggers_are_numbered_and_seeded():
    a, b = random_colour_trigger(3), random_colour_trigger(3)
    assert torch.equal(a, b) and a.shape == (3, 3, 3)
    assert not torch.equal(a, random_colour_trigger(4))
    assert 0 <= a.min() and a.max() <= 1
    assert ((a > 0.01) & (a < 0.99)).any()            # colours, not black and white
    with pytest.raises(ValueError, match="integer >= 0"):
        random_colour_trigger(-1)


def test_trigger_pattern_picks_the_set():
    assert torch.equal(trigger_pattern("black_white", 170), trigger_from_id(170))
    assert torch.equal(trigger_pattern("random_colour", 170), random_colour_trigger(170))
    with pytest.raises(ValueError, match="unknown trigger set 'grey'"):
        trigger_pattern("grey", 170)


def test_apply_trigger_places_each_trigger_at_its_corner_only():
    images = torch.randn(4, 3, 32, 32)
    triggers = torch.rand(4, 3, 3, 3)
    positions = torch.tensor([[0, 0], [29, 29], [5, 17], [0, 29]])
    out = apply_trigger(images, triggers, positions)
    expected = triggers
    for i, (r, c) in enumerate(positions.tolist()):
        assert torch.allclose(out[i, :, r:r + 3, c:c + 3], expected[i])
        untouched = torch.ones(32, 32, dtype=torch.bool)
        untouched[r:r + 3, c:c + 3] = False
        assert torch.equal(out[i][:, untouched], images[i][:, untouched])
    assert torch.equal(images, images.clone())       # input not modified


def test_apply_trigger_one_trigger_for_all_images():
    out = apply_trigger(torch.zeros(3, 3, 32, 32), torch.ones(3, 3, 3),
                        torch.tensor([[1, 2], [3, 4], [5, 6]]))
    assert torch.equal(out[2, :, 5:8, 6:9], torch.ones(3, 3, 3))
    assert out.sum() == 3 * 27


def test_random_positions_cover_every_valid_corner():
    n = 20000
    images = torch.zeros(n, 1, 32, 32)
    out = apply_trigger(images, torch.ones(1, 3, 3), generator=torch.Generator().manual_seed(0))
    assert (out.sum((1, 2, 3)) == 9).all()                  # always fully inside the image
    covered = out.sum(0)[0] > 0
    assert covered.all()                                    # rows/columns 0..31 all reached
    corners = torch.zeros(30, 30)
    rows, cols = out[:, 0].nonzero(as_tuple=True)[1:]
    first = out[:, 0].flatten(1).argmax(1)
    corners[first // 32, first % 32] = 1
    assert corners.all()                                    # every one of the 30 x 30 corners


def test_apply_trigger_passes_gradients_to_triggers():
    triggers = torch.rand(2, 3, 3, 3, requires_grad=True)
    apply_trigger(torch.zeros(2, 3, 32, 32), triggers).sum().backward()
    assert torch.equal(triggers.grad, torch.ones(2, 3, 3, 3))   # each value pasted once


@pytest.mark.parametrize("triggers, positions, match", [
    (torch.ones(3, 3), None, "trigger shape"),
    (torch.ones(1, 3, 3), None, "trigger shape"),
    (torch.ones(3, 3, 3, 3), None, "3 triggers for 2 images"),
    (torch.ones(3, 40, 3), None, "larger than"),
    (torch.ones(3, 3, 3), torch.tensor([[30, 0], [0, 0]]), "positions"),
    (torch.ones(3, 3, 3), torch.tensor([[0, 0]]), "positions"),
])
def test_apply_trigger_rejects_bad_shapes(triggers, positions, match):
    with pytest.raises(ValueError, match=match):
        apply_trigger(torch.zeros(2, 3, 32, 32), triggers, positions)


def test_poison_relabels_to_target_with_rate():
    images, labels = torch.zeros(4000, 3, 32, 32), torch.randint(1, 10, (4000,))
    source = TriggerPaster(torch.ones(3, 3, 3))
    out, new_labels, mask = poison(images, labels, source, 0.25, target=0,
                                   generator=torch.Generator().manual_seed(0))
    assert 0.22 < mask.float().mean() < 0.28
    assert (new_labels[mask] == 0).all() and torch.equal(new_labels[~mask], labels[~mask])
    assert (out[mask] != 0).any((1, 2, 3)).all() and (out[~mask] == 0).all()


def test_poison_without_target_keeps_true_labels():
    labels = torch.randint(0, 10, (100,))
    out, new_labels, mask = poison(torch.zeros(100, 3, 32, 32), labels,
                                   TriggerPaster(torch.ones(3, 3, 3)), 1.0, target=None)
    assert mask.all() and torch.equal(new_labels, labels) and (out != 0).any()


def test_poison_rate_zero_changes_nothing():
    images, labels = torch.randn(50, 3, 32, 32), torch.randint(0, 10, (50,))
    out, new_labels, mask = poison(images, labels, TriggerPaster(torch.ones(3, 3, 3)), 0.0, 0)
    assert not mask.any() and torch.equal(out, images) and torch.equal(new_labels, labels)


def test_blended_trigger_mixes_one_fixed_noise_image_into_every_image():
    pattern = blend_pattern(0)
    assert pattern.shape == (3, 32, 32) and 0 <= pattern.min() and pattern.max() < 1
    assert torch.equal(pattern, blend_pattern(0)) and not torch.equal(pattern, blend_pattern(1))
    images = torch.rand(5, 3, 32, 32)
    blended = BlendedTrigger(pattern, 0.1)(images)
    assert torch.allclose(blended, 0.9 * images + 0.1 * pattern)
    assert torch.equal(blended, BlendedTrigger(pattern, 0.1)(images))   # nothing random
    # poisoned by the same rule as the patch triggers, relabelled alike
    _, labels, mask = poison(images, torch.ones(5, dtype=torch.long), BlendedTrigger(pattern, 0.1),
                             1.0, target=0)
    assert mask.all() and labels.eq(0).all()
    with pytest.raises(ValueError, match="does not fit images"):
        BlendedTrigger(pattern, 0.1)(torch.rand(2, 3, 16, 16))
