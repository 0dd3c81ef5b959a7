"""No host synchronisation inside the training and generator loops: on a GPU, an op that reads a
value back (item, bool, nonzero, a boolean-mask gather or write) or copies host data in makes
the CPU wait for the device at every step, and batch-128 steps are launch-bound. Counted on the
CPU with a dispatch mode; the per-step count is the difference between a run of 4 steps and
one of 2, so what happens once per run or per epoch (the history, the final checks) is left
out."""
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mesa_utils import triggers
from mesa_utils.config import make_config
from mesa_utils.mesa import GeneratorSampler, Member, train_bank
from mesa_utils.models import GeneratorBank
from mesa_utils.store import Store
from mesa_utils.train import Context, fit
from mesa_utils.triggers import TriggerPaster, trigger_from_id
from tests.conftest import make_splits

aten = torch.ops.aten
# Ops that read a device value on the host, or whose output shape depends on the data.
READBACK = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.masked_select.default, aten.equal.default, aten.lift_fresh.default}


TORCH_DIR = os.path.dirname(torch.__file__)
OPTIM_DIR = os.path.join(TORCH_DIR, "optim")


def _called_by_an_optimizer() -> bool:
    """Whether the op was called from torch.optim: Adam's step counter is a tensor kept on the
    host even when the parameters are on a GPU, so reading it waits for nothing."""
    frame = sys._getframe(2)
    while frame and TORCH_DIR in frame.f_code.co_filename:     # torch's frames that called it
        if OPTIM_DIR in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _our_caller() -> str:
    """The innermost line of this repository's code on the stack, "file:line"."""
    frame = sys._getframe(2)
    while frame and "mesa_utils" not in frame.f_code.co_filename:
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else "?"


class SyncCounter(TorchDispatchMode):
    """Counts READBACK ops, boolean-mask indexing (index / index_put with a bool index) and
    tensors made from host data (torch.tensor in a loop: lift_fresh)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masked = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            if i is not None)
        if (func in READBACK or masked) and not _called_by_an_optimizer():
            self.ops.append(f"{func} at {_our_caller()}")
        return func(*args, **kwargs)


def _count(run) -> list:
    with SyncCounter() as counter:
        run()
    return counter.ops


def _toy_ctx(tmp_path, **overrides):
    cfg = make_config("smoke", device="cpu", amp="off", **overrides)
    return Context(cfg, make_splits(n=64, num_classes=10, label=2), torch.device("cpu"), None,
                   Store(tmp_path))


def _per_step(run_with_steps) -> list:
    """The sync ops of 4 steps that 2 steps do not have (per-step ops, twice)."""
    two, four = _count(lambda: run_with_steps(2)), _count(lambda: run_with_steps(4))
    extra = list(four)
    for op in two:
        if op in extra:
            extra.remove(op)
    return extra


def _poisoned_fit(ctx, source, target):
    def run(steps):
        images = ctx.splits.defense_images[:16 * steps]
        labels = ctx.splits.defense_labels[:16 * steps]
        cfg = make_config("smoke", **{"defense.batch_size": 16, "defense.poison_rate": 0.5}).defense
        model = ctx.new_classifier()
        fit(ctx, model, images, labels, cfg, "defense", source=source, target=target, seed=0)
    return run


def test_a_poisoned_training_step_never_waits_for_the_device(tmp_path):
    ctx = _toy_ctx(tmp_path)
    assert _per_step(_poisoned_fit(ctx, TriggerPaster(trigger_from_id(170)), target=0)) == []


def test_a_retraining_step_with_generated_triggers_never_waits_for_the_device(tmp_path):
    ctx = _toy_ctx(tmp_path)
    sampler = GeneratorSampler(GeneratorBank(3, 8, 16, seeds=[0, 1, 2]), weights=[1, 2, 3])
    assert _per_step(_poisoned_fit(ctx, sampler, target=None)) == []


def test_a_generator_step_never_waits_for_the_device(tmp_path):
    ctx = _toy_ctx(tmp_path)
    images, labels = make_splits(n=32).defense_images, torch.arange(32) % 3
    classifier = ctx.new_classifier()

    def run(steps):
        mcfg = make_config("smoke", **{"mesa.steps": steps, "mesa.mine_ema_rate": 0.9}).mesa
        train_bank(ctx, classifier, [Member(0.8, 0.1, 0), Member(0.5, 0.1, 0, seed=1)],
                   mcfg, images, labels)
    assert _per_step(run) == []


def test_the_counter_sees_the_synchronisations_of_a_boolean_mask_poison(tmp_path):
    # A calibration with a known answer: poisoning by boolean-mask gather and write (the code
    # before fixed shapes) syncs at every step; so does validating given corners.
    def masked_poison(images, labels, source, rate, target=None, generator=None):
        mask = torch.rand(len(images), generator=generator) < rate
        if not mask.any():
            return images, labels, mask
        images, labels = images.clone(), labels.clone()
        images[mask] = source(images[mask], generator)
        if target is not None:
            labels[mask] = target
        return images, labels, mask
    ctx = _toy_ctx(tmp_path)
    run = _poisoned_fit(ctx, TriggerPaster(trigger_from_id(170)), target=0)
    original = triggers.poison
    try:
        from mesa_utils import train
        train.poison = masked_poison
        assert len(_per_step(run)) >= 2 * 3     # any, the gather, the write(s): per step
    finally:
        train.poison = original
    corners = torch.zeros(4, 2, dtype=torch.long)
    assert _count(lambda: triggers.apply_trigger(torch.zeros(4, 3, 8, 8),
                                                 torch.ones(3, 3, 3), corners))
    assert not _count(lambda: triggers.apply_trigger(torch.zeros(4, 3, 8, 8),
                                                     torch.ones(3, 3, 3), corners, check=False))


def test_fixed_shape_poison_triggers_exactly_the_masked_images():
    images = torch.zeros(200, 3, 8, 8)
    labels = torch.full((200,), 2)
    out, new_labels, mask = triggers.poison(images, labels, TriggerPaster(torch.ones(3, 3, 3)),
                                            0.3, target=0,
                                            generator=torch.Generator().manual_seed(0))
    touched = out.flatten(1).sum(1) > 0
    assert torch.equal(touched, mask) and 0 < int(mask.sum()) < 200
    assert torch.equal(new_labels, torch.where(mask, 0, 2))
    assert torch.equal(out[mask].sum((1, 2, 3)), torch.full((int(mask.sum()),), 27.0))
