"""SampDetox's UNet: training and purification throughput with bf16 autocast against fp32.

The profile's UNet (random weights: speed does not depend on them) on whatever device torch
finds. Prints, for each precision, seconds per training step and images purified per second
(one reverse step is one UNet pass; an image costs t1 + t2 of them), then, last,
`bf16 speedup: train <ratio>, purify <ratio>`. --smoke: the smoke profile's UNet, 1 step over
8 images (seconds on a CPU), to prove the script runs.

    python benchmarks/diffusion_unet.py [--profile quick] [--steps 4] [--images 250] [--smoke]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from mesa_utils.config import make_config
from mesa_utils.sampdetox import new_unet
from mesa_utils.train import autocast, get_device

SMOKE = dict(profile="smoke", steps=1, images=8)


def seconds_per(fn, repeats):
    fn()                                    # warm-up: first calls pick kernels
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    scfg = make_config(args.profile).sampdetox
    device = get_device("auto")
    torch.manual_seed(0)
    unet = new_unet(scfg).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=scfg.lr)
    batch = torch.randn(scfg.batch_size, 3, 32, 32, device=device)
    inputs = torch.randn(args.images, 3, 32, 32, device=device)
    passes = scfg.t1 + scfg.t2
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def train_step():
            with autocast(device, dtype):
                out = unet(batch, torch.randint(scfg.max_train_timestep, (len(batch),),
                                                device=device)).sample
            loss = F.mse_loss(out.float(), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def reverse_step():
            with autocast(device, dtype):
                unet(inputs, 10).sample.float()
        train = seconds_per(train_step, args.steps)
        per_pass = seconds_per(reverse_step, args.steps)
        results[name] = (train, per_pass)
        print(f"{name}: {train:.3f} s per training step of {scfg.batch_size}; one UNet pass over "
              f"{args.images} images {per_pass:.3f} s -> {args.images / (per_pass * passes):.2f} "
              f"images purified per s ({passes} passes each)")
    print(f"bf16 speedup: train {results['fp32'][0] / results['bf16'][0]:.2f}, "
          f"purify {results['fp32'][1] / results['bf16'][1]:.2f}")


if __name__ == "__main__":
    main()
