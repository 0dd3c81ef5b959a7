"""Retraining throughput: K retrainings of one trigger as one banked network against the same K
one after another (defense.retrain_many with retrain_bank = K, or 1).

The profile's ResNet-18 and retraining recipe (random weights and images: speed does not depend
on them; a 3x3 trigger pasted at the profile's rate), on whatever device torch finds. Prints
the seconds per retraining step of each path, the time one unit's retrainings would take at
that pace, on a GPU the achieved TFLOP/s against the device's bf16 peak, the cost model's
minutes (mesa_utils.cost: the clean model, each stage of a unit, the whole run) at the measured
pace and, as lower bounds, at the bf16 peaks of an H200 and an A100, and, last,
`speedup <ratio>`. --smoke: the smoke profile, K = 2, 2 steps (seconds on a CPU), to prove the
script runs.

    python benchmarks/retrain_bank.py [--profile quick] [--k 8] [--steps 10] [--smoke]
"""
import argparse
import dataclasses
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mesa_utils import cost
from mesa_utils.config import make_config
from mesa_utils.data import Splits
from mesa_utils.models import ResNetBank
from mesa_utils.store import Store
from mesa_utils.train import Context, amp_dtype, autocast, fit, fit_bank, get_device
from mesa_utils.triggers import TriggerPaster

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "V100": 125.0}

SMOKE = dict(profile="smoke", k=2, steps=2)


def cost_lines(cfg, seconds_per_image: float, where: str) -> list:
    """The cost model's predictions (mesa_utils.cost) at `seconds_per_image`, as lines."""
    minutes = cost.predicted_minutes(cfg, seconds_per_image)

    def shown(m):
        return f"{m:.1f} min" if m >= 1 else f"{60 * m:.1f} s"
    stages = ", ".join(f"{stage} {shown(m)}"
                       for stage, m in minutes["per trigger by stage"].items())
    return [f"cost model {where}: clean model {shown(minutes['clean model'])}; per trigger "
            f"{shown(minutes['per trigger'])} ({stages}); the profile's {len(cfg.triggers)} "
            f"triggers with the clean model {shown(minutes['run'])}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--k", type=int, default=8, help="retrainings per bank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per retraining")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    device = get_device("auto")
    cfg = make_config(args.profile)
    recipe = cfg.defense
    batch = recipe.batch_size
    images = torch.randint(0, 256, (args.steps * batch, 32, 32, 3), dtype=torch.uint8,
                           device=device)
    labels = torch.randint(0, 10, (len(images),), device=device)
    splits = Splits("random", [str(c) for c in range(10)], images, labels, images, labels,
                    images, labels, fingerprint="random")
    ctx = Context(cfg, splits, device, amp_dtype(device, cfg.amp), Store("/nonexistent"))
    one_epoch = dataclasses.replace(recipe, epochs=1)
    trigger = TriggerPaster(torch.ones(3, 3, 3, device=device))
    seeds = list(range(args.k))

    def synchronised(fn):
        fn()                                # warm-up: first calls pick kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def sequential():
        for seed in seeds:
            fit(ctx, ctx.new_classifier(), images, labels, one_epoch, "defense", source=trigger,
                seed=seed)

    def banked():
        bank = ResNetBank([ctx.new_classifier() for _ in seeds])
        fit_bank(ctx, bank, images, labels, one_epoch, "defense", [trigger] * args.k, seeds)

    sequential_seconds = synchronised(sequential)
    bank_seconds = synchronised(banked)
    # FLOPs of one model's training step (forward + backward), counted by torch
    model = ctx.new_classifier()
    x = torch.rand(batch, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter, autocast(device, ctx.amp):
        model(x).float().logsumexp(1).mean().backward()
    flops_per_step = counter.get_total_flops()

    model_steps = args.k * args.steps
    per_unit = cost.retrainings_per_unit(cfg)
    defender_images = (cfg.test_subset or 10000) - cfg.eval_size    # the test split less eval
    unit_steps = per_unit * recipe.epochs * (defender_images // batch)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({device_name}), autocast {ctx.amp or 'off'}, profile "
          f"{cfg.profile}: ResNet-18 width {cfg.width}, batch {batch}, K = {args.k} "
          f"retrainings x {args.steps} steps")
    for name, seconds in (("sequential", sequential_seconds), ("bank", bank_seconds)):
        achieved = flops_per_step * model_steps / seconds / 1e12
        print(f"{name:>10}: {seconds / model_steps * 1e3:8.2f} ms per retraining step, "
              f"{achieved:7.3f} TFLOP/s; one unit's {per_unit} retrainings "
              f"({unit_steps} steps) ~{seconds / model_steps * unit_steps / 60:.1f} min")
    # the lone path's pace: retrain_bank is 1 in every profile (its banks key other results)
    for line in cost_lines(cfg, sequential_seconds / model_steps / batch,
                           f"at this measured pace ({device_name})"):
        print(line)
    if device.type == "cuda":
        peak = next((v for key, v in BF16_PEAK_TFLOPS.items() if key in device_name), None)
        best = flops_per_step * model_steps / min(bank_seconds, sequential_seconds) / 1e12
        print(f"bf16 peak of {device_name}: " +
              (f"{peak:g} TFLOP/s, the faster path at {100 * best / peak:.1f}%" if peak
               else "unknown"))
    for name, peak in BF16_PEAK_TFLOPS.items():
        if name in ("H200", "A100"):    # what the next command can be sized by
            for line in cost_lines(cfg, flops_per_step / batch / (peak * 1e12),
                                   f"at the {name}'s bf16 peak (a lower bound)"):
                print(line)
    print(f"speedup {sequential_seconds / bank_seconds:.2f}")


if __name__ == "__main__":
    main()
