import torch

from mesa_utils.data import STATS
from mesa_utils.models import GeneratorBank, ResNet18, StatisticsBank, frozen

CIFAR10 = STATS["cifar10"]


def test_resnet18_shapes_and_width():
    for width, classes in ((4, 10), (8, 100)):
        model = ResNet18(classes, width, *CIFAR10)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
        assert model.head.in_features == 8 * width
    assert sum(p.numel() for p in ResNet18(10, 64, *CIFAR10).parameters()) == 11_173_962  # the paper's


def test_resnet18_normalises_its_pixels_with_the_given_statistics():
    # The classifier is the one place that normalises: its stem sees (x - mean) / std, and
    # the statistics are not part of its weights (a state dict loads across data sets).
    torch.manual_seed(0)
    cifar100 = STATS["cifar100"]
    model = ResNet18(100, 4, *cifar100).eval()
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in cifar100)
    plain = ResNet18(100, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()
    plain.load_state_dict(model.state_dict())
    assert "mean" not in model.state_dict()
    assert torch.allclose(model(pixels), plain((pixels - mean) / std), atol=1e-5)
    assert not torch.allclose(model(pixels), plain(pixels), atol=1e-3)


def test_frozen_model_accumulates_no_parameter_gradients():
    model = frozen(ResNet18(10, 4, *CIFAR10))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model.parameters())
    assert not model.training


def test_generator_output_shape_and_range():
    bank = GeneratorBank(3, noise_dim=64, hidden=32, trigger_shape=(3, 5, 5))
    out = bank(bank.noise(16))
    assert out.shape == (3, 16, 3, 5, 5) and 0 < out.min() and out.max() < 1


def test_bank_equals_separate_generators_with_the_same_seeds():
    seeds = [5, 9, 11]
    bank = GeneratorBank(3, hidden=32, seeds=seeds)
    singles = [GeneratorBank(1, hidden=32, seeds=[s]) for s in seeds]
    z = torch.rand(3, 8, 64)
    for mode in ("train", "eval"):
        for net in [bank] + singles:
            getattr(net, mode)()
        together = bank(z)
        for i, single in enumerate(singles):
            assert torch.allclose(together[i], single(z[i:i + 1])[0], atol=1e-6), mode


def test_batchnorm_statistics_stay_per_member():
    bank = GeneratorBank(2, hidden=16)
    z = torch.rand(2, 8, 64)
    first = bank(z)[0]
    z[1] = z[1] * 0 + 0.5                # change only member 1's inputs
    assert torch.allclose(bank(z)[0], first)


def test_statistics_bank_shape_and_members_independent():
    stats = StatisticsBank(2, noise_dim=8, hidden=16, trigger_shape=(3, 3, 3), seeds=[1, 2])
    single = StatisticsBank(1, noise_dim=8, hidden=16, trigger_shape=(3, 3, 3), seeds=[2])
    z, x = torch.rand(2, 5, 8), torch.rand(2, 5, 3, 3, 3)
    out = stats(z, x)
    assert out.shape == (2, 5)
    assert torch.allclose(out[1], single(z[1:], x[1:])[0], atol=1e-6)


def test_bad_bank_arguments_are_clear_errors():
    import pytest
    with pytest.raises(ValueError, match="divisible by 4"):
        GeneratorBank(2, noise_dim=30)
    with pytest.raises(ValueError, match="3 seeds for a bank of 2"):
        GeneratorBank(2, seeds=[1, 2, 3])
