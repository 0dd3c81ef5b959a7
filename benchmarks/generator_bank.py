"""Generator training throughput: K generators as one bank vs the same K one after another.

Same frozen classifier (the profile's ResNet-18 width, random weights: speed does not depend on
them), same batch size, same steps, on whatever device torch finds. Prints steps/s per
generator for both and, last, `speedup <ratio>`. --smoke: tiny sizes (seconds on a CPU), to
prove the script runs.

    python benchmarks/generator_bank.py [--k 10] [--steps 20] [--batch 128] [--width 16] [--smoke]
"""
import argparse
import time

import torch

from mesa_utils.config import MesaConfig, make_config
from mesa_utils.data import Splits
from mesa_utils.mesa import Member, train_bank
from mesa_utils.store import Store
from mesa_utils.train import Context, amp_dtype, get_device

SMOKE = dict(k=2, steps=2, batch=8, width=8, hidden=16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    device = get_device("auto")
    cfg = make_config("smoke", width=args.width)
    n = 2048
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    splits = Splits("random", [str(c) for c in range(10)], images, labels, images, labels,
                    images, labels, fingerprint="random")
    ctx = Context(cfg, splits, device, amp_dtype(device, cfg.amp), Store("/nonexistent"))
    classifier = ctx.new_classifier()
    mcfg = MesaConfig(steps=args.steps, batch_size=args.batch, hidden=args.hidden)
    members = [Member(0.8, 0.1, c % 10, seed=c) for c in range(args.k)]

    def timed(group):
        warm_up = MesaConfig(steps=2, batch_size=args.batch, hidden=args.hidden)
        train_bank(ctx, classifier, group, warm_up, images, labels)  # first calls pick kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_bank(ctx, classifier, group, mcfg, images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    bank_seconds = timed(members)
    sequential_seconds = sum(timed([m]) for m in members)
    print(f"device {device}, autocast {ctx.amp or 'off'}, ResNet-18 width {args.width}, "
          f"K={args.k}, batch {args.batch}, {args.steps} steps")
    print(f"bank:       {args.k * args.steps / bank_seconds:8.2f} generator-steps/s "
          f"({bank_seconds:.1f} s)")
    print(f"sequential: {args.k * args.steps / sequential_seconds:8.2f} generator-steps/s "
          f"({sequential_seconds:.1f} s)")
    print(f"speedup {sequential_seconds / bank_seconds:.2f}")


if __name__ == "__main__":
    main()
