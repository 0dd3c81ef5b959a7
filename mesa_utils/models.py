"""Networks: the CIFAR ResNet-18 classifier (and K of them as one bank, for retraining), and
banks of MESA generators and MINE networks.

A bank holds K independent small networks with stacked weights (K, in, out), so that one
batched matrix multiply runs all K and one optimiser step trains all K: the K generators of a
staircase (betas), of an alpha sweep or of the 10 classes of detection train as one module.
Each member is initialised from its own seed exactly as a lone network with that seed would be.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Classifier: CIFAR-style ResNet-18 (3x3 stride-1 stem, no max-pool, 4x4 average pool)

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """(B, 3, 32, 32) pixels in [0, 1] -> (B, num_classes) logits. width 64 = the paper's.

    It normalises its input with the data set's per-channel `mean` and `std` ((3,) each, e.g.
    data.STATS["cifar10"]) as its first step, so every trigger, mask and sample outside it
    lives in pixel space and no caller handles the statistics. They are given, not defaulted
    (CIFAR-100 must not get CIFAR-10's), and not saved in the weights (fixed per data set).
    """

    def __init__(self, num_classes, width, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            cout = width * mult
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem((x - self.mean) / self.std))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: gradients flow only to the inputs."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _grouped(module: nn.Module, members: list, k: int) -> nn.Module:
    """`module` (one layer or container of members[0]'s architecture) rebuilt to run the k
    `members` side by side on activations stacked along channels, (B, k * C, H, W): each
    convolution grouped by member, each batch norm over all k * C channels (its statistics are
    per channel, hence per member: each member normalises with its own images only)."""
    if isinstance(module, nn.Conv2d):
        conv = nn.Conv2d(module.in_channels * k, module.out_channels * k, module.kernel_size,
                         module.stride, module.padding, module.dilation, module.groups * k,
                         module.bias is not None, module.padding_mode,
                         device=module.weight.device, dtype=module.weight.dtype)
        conv.weight = nn.Parameter(torch.cat([m.weight.detach() for m in members]))
        if module.bias is not None:
            conv.bias = nn.Parameter(torch.cat([m.bias.detach() for m in members]))
        return conv
    if isinstance(module, nn.BatchNorm2d):
        norm = nn.BatchNorm2d(module.num_features * k, module.eps, module.momentum,
                              device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(torch.cat([getattr(m, name) for m in members]))
            norm.num_batches_tracked.copy_(module.num_batches_tracked)
        return norm
    if module._parameters or module._buffers:
        raise TypeError(f"cannot bank a {type(module).__name__}: only Conv2d and BatchNorm2d "
                        "layers hold weights in a bankable network")
    clone = copy.copy(module)
    clone.__dict__ = {**module.__dict__, "_modules": {
        name: _grouped(child, [m._modules[name] for m in members], k)
        for name, child in module._modules.items()}}
    return clone


class ResNetBank(nn.Module):
    """K ResNet18 of one architecture as one network: pixels (K, B, 3, 32, 32) in [0, 1] ->
    logits (K, B, num_classes), member k computing what models[k] computes on x[k].

    The members' activations are stacked along channels, every convolution runs as one grouped
    convolution (groups = K), every batch norm over K x its channels, the head as one batched
    matrix multiply: one forward, backward and optimiser step train all K (SGD is elementwise,
    so one optimiser over the bank is K optimisers). Only the summation order of the
    convolutions differs from K separate models, so results agree to float rounding.
    `member_state_dict(i)` gives member i back as a ResNet18's weights.
    """

    def __init__(self, models: list):
        super().__init__()
        first = models[0]
        shapes = {name: t.shape for name, t in first.state_dict().items()}
        for i, model in enumerate(models[1:], 1):
            if {name: t.shape for name, t in model.state_dict().items()} != shapes:
                raise ValueError(f"model {i} of the bank has another architecture than model 0 "
                                 "(width, classes); a bank holds copies of one architecture")
        self.k = len(models)
        self.register_buffer("mean", first.mean.clone(), persistent=False)
        self.register_buffer("std", first.std.clone(), persistent=False)
        self.stem = _grouped(first.stem, [m.stem for m in models], self.k)
        self.blocks = _grouped(first.blocks, [m.blocks for m in models], self.k)
        self.head_weight = nn.Parameter(torch.stack([m.head.weight.detach() for m in models]))
        self.head_bias = nn.Parameter(torch.stack([m.head.bias.detach() for m in models]))

    def forward(self, x):
        k, b = x.shape[:2]
        x = ((x - self.mean) / self.std).transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        # channels-last, as the loader's pixels and the models' weights (Context.new_classifier)
        x = x.contiguous(memory_format=torch.channels_last)
        features = F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).view(b, k, -1)
        return torch.baddbmm(self.head_bias.unsqueeze(1), features.transpose(0, 1),
                             self.head_weight.transpose(1, 2))

    def member_state_dict(self, i: int) -> dict:
        """Member i's weights and batch-norm statistics, named as ResNet18's state_dict."""
        state = {"head.weight": self.head_weight[i].detach().clone(),
                 "head.bias": self.head_bias[i].detach().clone()}
        for name, t in self.state_dict().items():
            if name.endswith("num_batches_tracked"):
                state[name] = t.clone()
            elif not name.startswith("head_"):
                state[name] = t.chunk(self.k)[i].clone()
        return state


# ---------------------------------------------------------------------------------------------
# Banks of small fully connected networks

class BankLinear(nn.Module):
    """K independent linear layers: (K, B, fan_in) -> (K, B, fan_out)."""

    def __init__(self, k, fan_in, fan_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, fan_in, fan_out))
        self.bias = nn.Parameter(torch.empty(k, 1, fan_out)) if bias else None

    def reset_member(self, i, generator):
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1 / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            self.weight[i].copy_(torch.rand(self.weight[i].T.shape, generator=generator).T
                                 * 2 * bound - bound)
            if self.bias is not None:
                self.bias[i].copy_(torch.rand(self.bias[i].shape, generator=generator)
                                   * 2 * bound - bound)

    def forward(self, x):
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class BankBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d with separate statistics and affine parameters per member: (K, B, F)."""

    def __init__(self, k, features):
        super().__init__(k * features)

    def forward(self, x):
        k, b, f = x.shape
        out = super().forward(x.permute(1, 0, 2).reshape(b, k * f))
        return out.view(b, k, f).permute(1, 0, 2)


def _seeds(k, seeds):
    seeds = list(range(k)) if seeds is None else list(seeds)
    if len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for a bank of {k}")
    return seeds


class GeneratorBank(nn.Module):
    """K MESA generators G_i: noise (K, B, noise_dim) in [0, 1) -> triggers (K, B, C, h, w).

    As the authors built it: four linear layers, the noise cut in four chunks, the first
    feeding layer 1 and each other concatenated to the input of layers 2-4; BatchNorm +
    LeakyReLU(0.2) after layers 1-3, sigmoid output in (0, 1).
    """

    def __init__(self, k, noise_dim=64, hidden=512, trigger_shape=(3, 3, 3), seeds=None):
        super().__init__()
        if noise_dim % 4:
            raise ValueError(f"noise_dim must be divisible by 4 (four chunks), got {noise_dim}")
        self.k, self.noise_dim, self.trigger_shape = k, noise_dim, tuple(trigger_shape)
        chunk, out = noise_dim // 4, math.prod(trigger_shape)
        self.linears = nn.ModuleList([BankLinear(k, chunk, hidden)] +
                                     [BankLinear(k, hidden + chunk, hidden) for _ in range(2)] +
                                     [BankLinear(k, hidden + chunk, out)])
        self.norms = nn.ModuleList([BankBatchNorm(k, hidden) for _ in range(3)])
        for i, seed in enumerate(_seeds(k, seeds)):
            generator = torch.Generator().manual_seed(seed)
            for layer in self.linears:
                layer.reset_member(i, generator)

    def forward(self, z):
        chunks = z.chunk(4, dim=-1)
        h = chunks[0]
        for i, layer in enumerate(self.linears):
            if i:
                h = torch.cat([h, chunks[i]], dim=-1)
            h = layer(h)
            if i < 3:
                h = F.leaky_relu(self.norms[i](h), 0.2)
        return torch.sigmoid(h).view(*z.shape[:2], *self.trigger_shape)

    def noise(self, batch, generator=None, device=None):
        """(K, batch, noise_dim) uniform [0, 1) noise, as the authors drew it."""
        return torch.rand(self.k, batch, self.noise_dim, generator=generator, device=device)


class StatisticsBank(nn.Module):
    """K MINE statistics networks T_i: (noise (K, B, nz), trigger (K, B, C, h, w)) -> (K, B).

    First layer linear(z) + linear(trigger) + bias, then a hidden layer, LeakyReLU(0.2) after
    each and after the scalar output, as in the authors' code.
    """

    def __init__(self, k, noise_dim=64, hidden=512, trigger_shape=(3, 3, 3), seeds=None):
        super().__init__()
        self.z_in = BankLinear(k, noise_dim, hidden, bias=False)
        self.x_in = BankLinear(k, math.prod(trigger_shape), hidden)
        self.hidden = BankLinear(k, hidden, hidden)
        self.out = BankLinear(k, hidden, 1)
        for i, seed in enumerate(_seeds(k, seeds)):
            generator = torch.Generator().manual_seed(seed + 1_000_003)
            for layer in (self.z_in, self.x_in, self.hidden, self.out):
                layer.reset_member(i, generator)

    def forward(self, z, x):
        h = F.leaky_relu(self.z_in(z) + self.x_in(x.flatten(2)), 0.2)
        h = F.leaky_relu(self.hidden(h), 0.2)
        return F.leaky_relu(self.out(h), 0.2).squeeze(-1)
