"""Shared fixtures: a tiny synthetic context and a toy backdoored model with a known valid set."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mesa_utils.config import make_config
from mesa_utils.data import Splits
from mesa_utils.store import Store
from mesa_utils.train import Context


class BrightPatchModel(nn.Module):
    """Toy 'backdoored model' on black images. Clean images are recognised as `natural`
    (logit 2, others 0); the target's logit is gain * (s - centre), with s the brightness
    (mean over channels and pixels) of the brightest 3x3 window. So the target softmax F
    depends on the trigger's mean brightness alone and the valid set {x : F(x) > beta} is
    known exactly: triggers brighter than `valid_brightness(beta)`."""

    def __init__(self, num_classes=3, target=0, natural=2, gain=20.0, centre=0.6):
        super().__init__()
        self.num_classes, self.target, self.natural = num_classes, target, natural
        self.gain, self.centre = gain, centre
        self.dummy = nn.Parameter(torch.zeros(1))   # so that frozen() has a parameter to freeze

    def forward(self, pixels):
        s = F.avg_pool2d(pixels.mean(1, keepdim=True), 3, stride=1).flatten(1).max(1).values
        logits = torch.zeros(len(pixels), self.num_classes) + self.dummy
        logits[:, self.natural] = 2.0
        logits[:, self.target] = self.gain * (s - self.centre)
        return logits

    def valid_brightness(self, beta):
        others = math.exp(2.0) + self.num_classes - 2       # sum of exp(logit) of the others
        return self.centre + math.log(beta / (1 - beta) * others) / self.gain


def make_splits(n=64, num_classes=3, label=2, value=0):
    """Uniform images (every pixel `value`), all labelled `label`, in every split."""
    images = torch.full((n, 32, 32, 3), value, dtype=torch.uint8)
    labels = torch.full((n,), label, dtype=torch.long)
    return Splits("toy", [str(c) for c in range(num_classes)],
                  images, labels, images.clone(), labels.clone(), images.clone(), labels.clone(),
                  fingerprint="toy")


@pytest.fixture
def toy_ctx(tmp_path):
    cfg = make_config("smoke", device="cpu", amp="off")
    return Context(cfg, make_splits(), torch.device("cpu"), None, Store(tmp_path / "store"))
