"""SampDetox (Yang et al., NeurIPS 2024): black-box purification of every input with a DDPM.

The defence never touches the classifier. Each input x (pixels in [0, 1]) is purified in two
stages before it is classified:

1. global: noise the whole image to level t1 (light), denoise back to level 0 -> x1. Triggers
   of low visibility (a faint blend) do not survive the noise.
2. local: the per-pixel SSIM between x and x1 (scikit-image, Wang et al.'s Gaussian window)
   is low where denoising changed the image's structure most, which is where a high-visibility
   trigger (a pasted patch) sits. Those pixels get noise up to level t2, the others less:
   level(p) = round(t2 * (s_max - s(p)) / (s_max - s_min)) per image, the published code's
   min-max scaling. Each pixel is then denoised from its own level -> the purified input.

"Level L" means L forward steps of the DDPM: level 0 is the image itself, level L >= 1 is
diffusers' timestep L - 1. Denoising from a level map runs the reverse steps from the highest
level down; a pixel is updated only by the steps at or below its own level, so a pixel at level
0 is never changed. Everything runs on whole batches: one UNet pass per reverse step for all
images and pixels.

The diffusion model (diffusers' UNet2DModel, cosine DDPMScheduler, T = cfg.sampdetox.timesteps)
is trained here on the clean training images, with timesteps drawn below
cfg.sampdetox.max_train_timestep (purification never starts above t2), and cached in the
artefact store.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import SampDetoxConfig
from .data import to_pixels
from .intervals import wilson_interval
from .stages import DIFFUSION, PURIFIED
from .store import spec_key
from .train import (Backdoor, Context, FiniteGuard, autocast, probabilities, progress,
                    state_dict_cpu)


def _diffusers():
    """diffusers' (UNet2DModel, DDPMScheduler). diffusers imports torchvision whenever the
    package is installed (for video models this code never uses); a torchvision build that
    does not match torch (a CUDA torchvision beside a CPU torch) then breaks the import of the
    UNet. Such a torchvision is declared absent to diffusers, which needs none of it here."""
    import diffusers.utils.import_utils as diffusers_imports
    if diffusers_imports.is_torchvision_available():
        try:
            import torchvision  # noqa: F401
        except Exception:       # RuntimeError "operator torchvision::nms does not exist"
            diffusers_imports._torchvision_available = False
    from diffusers import DDPMScheduler, UNet2DModel
    return UNet2DModel, DDPMScheduler


def new_scheduler(scfg: SampDetoxConfig):
    """The DDPM noise schedule: cosine (Nichol and Dhariwal), scfg.timesteps steps."""
    _, DDPMScheduler = _diffusers()
    return DDPMScheduler(num_train_timesteps=scfg.timesteps, beta_schedule="squaredcos_cap_v2")


def new_unet(scfg: SampDetoxConfig):
    """A noise-predicting UNet for 32x32 RGB in [-1, 1]: one resolution per width of
    scfg.channels (32, 16, 8, ... pixels), self-attention at the lowest. GroupNorm takes 32
    groups (the usual), fewer where a width is not a multiple of 32."""
    UNet2DModel, _ = _diffusers()
    depth = len(scfg.channels)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                       layers_per_block=scfg.layers_per_block,
                       norm_num_groups=math.gcd(32, *scfg.channels),
                       block_out_channels=tuple(scfg.channels),
                       down_block_types=("DownBlock2D",) * (depth - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1))


# ---------------------------------------------------------------------------------------------
# Noising to and denoising from per-pixel levels

def alpha_bar(scheduler, levels: torch.Tensor) -> torch.Tensor:
    """The signal share alpha_bar of each level (any shape of ints in [0, T]); level 0 is 1."""
    table = torch.cat([torch.ones(1), scheduler.alphas_cumprod.float()]).to(levels.device)
    return table[levels]


def noise_to_levels(scheduler, x: torch.Tensor, levels: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in [-1, 1] noised to `levels` (broadcastable to x, ints in [0, T]):
    sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise, pixel by pixel (DDPM's q(x_L | x_0))."""
    a = alpha_bar(scheduler, levels)
    return a.sqrt() * x + (1 - a).sqrt() * noise


@torch.no_grad()
def denoise_from_levels(ctx: Context, unet, scheduler, x: torch.Tensor, levels: torch.Tensor,
                        generator=None) -> torch.Tensor:
    """Run DDPM's reverse steps on x (N, C, H, W) in [-1, 1], each pixel from its own level
    (`levels` broadcastable to x, ints in [0, T]) down to 0: the step from level L to L - 1
    (diffusers' timestep L - 1) updates only the pixels at level >= L. Pixels at level 0 are
    returned unchanged."""
    levels = levels.to(x.device)
    for level in range(int(levels.max()), 0, -1):
        with autocast(ctx.device, ctx.amp):
            eps = unet(x, level - 1).sample.float()
        stepped = scheduler.step(eps, level - 1, x, generator=generator).prev_sample
        x = torch.where(levels >= level, stepped, x)
    return x


def ssim_map(inputs: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, H, W) SSIM of each pixel between two batches (N, C, H, W) of pixels in [0, 1],
    averaged over the channels; in [-1, 1], 1 where the two agree.

    scikit-image's structural_similarity with Wang et al.'s settings (Gaussian window of sigma
    1.5, population covariances) and data_range 1, the range of the pixels as they are. All
    images and channels go through one call, as the channels of one image: SSIM treats every
    channel alone, so the result is that of one call per image."""
    from skimage.metrics import structural_similarity
    n, c, h, w = inputs.shape
    a = inputs.detach().float().cpu().reshape(n * c, h, w).numpy()
    b = references.detach().float().cpu().reshape(n * c, h, w).numpy()
    _, full = structural_similarity(a, b, channel_axis=0, data_range=1.0, full=True,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
    return torch.from_numpy(np.ascontiguousarray(full)).view(n, c, h, w).mean(1).to(inputs.device)


def levels_from_ssim(ssim: torch.Tensor, t2: int) -> torch.Tensor:
    """(N, 1, H, W) int levels in [0, t2] from an SSIM map (N, H, W): each image's least
    similar pixel gets t2, its most similar 0, linearly between (min-max per image). An image
    whose map is constant gets 0 everywhere."""
    low = ssim.flatten(1).min(1).values[:, None, None]
    high = ssim.flatten(1).max(1).values[:, None, None]
    scaled = (high - ssim) / (high - low).clamp(min=1e-12)
    return (scaled * t2).round().long().clamp(0, t2)[:, None]


@torch.no_grad()
def purify(ctx: Context, unet, scheduler, pixels: torch.Tensor, seed: int = 0) -> dict:
    """SampDetox on pixels (N, C, H, W) in [0, 1], in batches of eval_batch_size.

    Returns {"stage1": x1, "output": the purified images, both (N, C, H, W) in [0, 1];
    "ssim": (N, H, W) the SSIM map of x against x1; "levels": (N, H, W) stage 2's levels;
    "stage1_seconds", "seconds": wall time of stage 1 and of both stages}.
    """
    scfg = ctx.cfg.sampdetox
    generator = torch.Generator(ctx.device).manual_seed(seed)
    out = {"stage1": [], "output": [], "ssim": [], "levels": []}
    started, stage1_seconds = time.perf_counter(), 0.0
    unet.eval()
    for start in progress(range(0, len(pixels), scfg.eval_batch_size), "SampDetox"):
        stage1_started = time.perf_counter()
        x = pixels[start:start + scfg.eval_batch_size].to(ctx.device)
        signed = 2 * x - 1
        # stage 1: every pixel to level t1 and back
        flat = torch.full((len(x), 1, 1, 1), scfg.t1, device=ctx.device)
        noise = torch.randn(x.shape, device=ctx.device, generator=generator)
        x1 = denoise_from_levels(ctx, unet, scheduler,
                                 noise_to_levels(scheduler, signed, flat, noise), flat, generator)
        x1 = ((x1 + 1) / 2).clamp(0, 1)
        stage1_seconds += time.perf_counter() - stage1_started
        # stage 2: the pixels stage 1 changed most, noised most
        ssim = ssim_map(x, x1)
        levels = levels_from_ssim(ssim, scfg.t2)
        noise = torch.randn(x.shape, device=ctx.device, generator=generator)
        x2 = denoise_from_levels(ctx, unet, scheduler,
                                 noise_to_levels(scheduler, 2 * x1 - 1, levels, noise), levels,
                                 generator)
        for name, value in (("stage1", x1), ("output", ((x2 + 1) / 2).clamp(0, 1)),
                            ("ssim", ssim), ("levels", levels[:, 0])):
            out[name].append(value)
    return {**{name: torch.cat(values) for name, values in out.items()},
            "stage1_seconds": stage1_seconds, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# The diffusion model, trained once per profile and cached

def diffusion_spec(ctx: Context) -> dict:
    """The diffusion model's spec: stages.DIFFUSION's fields, the training images' fingerprint
    and the autocast dtype it trained under."""
    return DIFFUSION.spec(ctx.cfg, data=ctx.splits.fingerprint, amp_dtype=str(ctx.amp))


def train_diffusion(ctx: Context, images: torch.Tensor, seed: int = 0) -> dict:
    """Train the UNet to predict the noise of x_t (DDPM's simple loss) on uint8 images
    (N, H, W, C), random horizontal flips, t uniform in [0, max_train_timestep). Returns
    {"state_dict": the EMA weights, "history": mean loss per tenth of training,
    "train_seconds", "images_seen"}."""
    scfg = ctx.cfg.sampdetox
    torch.manual_seed(seed)
    unet = new_unet(scfg).to(ctx.device)
    scheduler = new_scheduler(scfg)
    ema = torch.optim.swa_utils.AveragedModel(
        unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(scfg.ema_decay))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=scfg.lr)
    generator = torch.Generator(ctx.device).manual_seed(seed)
    guard = FiniteGuard("diffusion model", scfg.train_steps,
                        f"Lower sampdetox.lr (now {scfg.lr:g}).", ctx.device)
    history, loss_sum, chunk = [], torch.zeros((), device=ctx.device), max(1, scfg.train_steps // 10)
    started = time.perf_counter()
    unet.train()
    for step in progress(range(scfg.train_steps), "diffusion model"):
        index = torch.randint(len(images), (scfg.batch_size,), device=ctx.device,
                              generator=generator)
        x = 2 * to_pixels(images[index]) - 1
        flip = torch.rand(len(x), device=ctx.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        t = torch.randint(scfg.max_train_timestep, (len(x),), device=ctx.device,
                          generator=generator)
        noise = torch.randn(x.shape, device=ctx.device, generator=generator)
        noisy = noise_to_levels(scheduler, x, (t + 1)[:, None, None, None], noise)  # timestep t
        with autocast(ctx.device, ctx.amp):
            predicted = unet(noisy, t).sample
        loss = F.mse_loss(predicted.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update_parameters(unet)
        guard.watch(step, loss)
        loss_sum += loss.detach()
        if (step + 1) % chunk == 0:
            history.append({"step": step + 1, "loss": float(loss_sum) / chunk})
            loss_sum.zero_()
    guard.finish(list(ema.module.state_dict().items()))
    return {"state_dict": state_dict_cpu(ema.module), "history": history,
            "train_seconds": time.perf_counter() - started,
            "images_seen": scfg.train_steps * scfg.batch_size}


def diffusion_model(ctx: Context):
    """(unet in eval mode, scheduler, record): the profile's diffusion model, trained on the
    clean training images (ctx.splits.train_images: never the eval split) once and cached."""
    scfg = ctx.cfg.sampdetox
    spec = diffusion_spec(ctx)
    record = ctx.store.get_or_build(
        DIFFUSION.name, spec,
        lambda: train_diffusion(ctx, ctx.splits.train_images, ctx.cfg.seed))
    unet = new_unet(scfg).to(ctx.device)
    unet.load_state_dict(record["state_dict"])
    return unet.eval(), new_scheduler(scfg), {**record, "key": spec_key(spec)}


# ---------------------------------------------------------------------------------------------
# Evaluation: CA, PA and ASR after purification

def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded: an image as it is passed on
    (the inverse of data.to_pixels up to rounding)."""
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def eval_subset(ctx: Context):
    """(uint8 images (n, H, W, C), labels (n,)): the first sampdetox.eval_images images of the
    2K eval split (0 = all of it). The split is a seeded random draw, so its head is too."""
    n = ctx.cfg.sampdetox.eval_images or len(ctx.splits.eval_images)
    return ctx.splits.eval_images[:n], ctx.splits.eval_labels[:n]


def triggered_inputs(ctx: Context, backdoor: Backdoor) -> tuple:
    """(uint8 images, true labels): the eval subset's images outside the target class with
    the backdoor's own trigger (a patch at a seeded random position, or the blend)."""
    images, labels = eval_subset(ctx)
    keep = labels != backdoor.target
    generator = torch.Generator(ctx.device).manual_seed(ctx.cfg.seed)
    pixels = backdoor.source()(to_pixels(images[keep]), generator)
    return to_images(pixels), labels[keep]


def purified_images(ctx: Context, diffusion, images: torch.Tensor, source_spec: dict) -> dict:
    """purify() of uint8 `images` (N, H, W, C) with diffusion = diffusion_model(ctx), cached
    under the diffusion model, t1, t2 and `source_spec` (what the images are).

    Returns {"stage1", "output": uint8 (N, H, W, C), as an input would be passed on; "ssim",
    "levels": (N, H, W); "seconds_per_image": {"stage 1", "SampDetox"}: wall time per image of
    stage 1 and of both stages}."""
    unet, scheduler, diffusion_record = diffusion
    cfg = ctx.cfg
    spec = PURIFIED.spec(cfg, diffusion_record["key"], images=len(images), source=source_spec)

    def build():
        result = purify(ctx, unet, scheduler, to_pixels(images), cfg.seed)
        return {"stage1": to_images(result["stage1"]).cpu(),
                "output": to_images(result["output"]).cpu(),
                "ssim": result["ssim"].cpu(), "levels": result["levels"].to(torch.int16).cpu(),
                "seconds_per_image": {"stage 1": result["stage1_seconds"] / len(images),
                                      "SampDetox": result["seconds"] / len(images)}}
    return ctx.store.get_or_build(PURIFIED.name, spec, build)


def purified_triggered(ctx: Context, diffusion, backdoor: Backdoor) -> tuple:
    """(triggered uint8 images, their true labels, purified_images of them): the backdoor's
    triggered eval images (triggered_inputs) and their purification, cached per backdoor."""
    triggered, true_labels = triggered_inputs(ctx, backdoor)
    return triggered, true_labels, purified_images(
        ctx, diffusion, triggered, {"kind": "triggered", "backdoor": backdoor.key})


STAGES = {"none": None, "stage 1": "stage1", "SampDetox": "output"}   # row name -> images


def defence_metrics(ctx: Context, model, clean_images, labels, attacked_images, true_labels,
                    target: int) -> dict:
    """The paper's three measures of a defended pipeline, in [0, 1], each with its 95% Wilson
    interval (<name>_low, <name>_high): ca, the share of `clean_images` (uint8 (N, H, W, C))
    classified as `labels`; on `attacked_images` (triggered, from outside the target class),
    pa, the share classified as their `true_labels`, and asr, the share sent to `target`."""
    if (true_labels == target).any():
        raise ValueError(f"attacked images must come from outside the target class {target}: "
                         "ASR counts only those (the paper's footnote 1)")
    clean_pred = probabilities(ctx, model, clean_images).argmax(1).cpu()
    attacked_pred = probabilities(ctx, model, attacked_images).argmax(1).cpu()
    row = {}
    for metric, hits in (("ca", clean_pred == labels.cpu()),
                         ("pa", attacked_pred == true_labels.cpu()),
                         ("asr", attacked_pred == target)):
        k, n = int(hits.sum()), len(hits)
        low, high = wilson_interval(k, n)
        row.update({metric: k / n, f"{metric}_low": low, f"{metric}_high": high})
    return row


def sampdetox_rows(ctx: Context, backdoors: list) -> list:
    """06's table: per backdoored model (and per stage: "none" = no defence, "stage 1" = the
    global stage alone, "SampDetox" = both) clean accuracy CA on the purified eval subset, and
    on its triggered images outside the target class PA (classified as their true label) and
    ASR (classified as the target), each with its 95% Wilson interval, and the purification's
    seconds per image. The clean images are purified once: the defence never sees the model."""
    diffusion = diffusion_model(ctx)
    key = diffusion[2]["key"]
    images, labels = eval_subset(ctx)
    cfg = ctx.cfg
    clean = purified_images(ctx, diffusion, images,
                            {"kind": "clean", "data": ctx.splits.fingerprint,
                             "test_subset": cfg.test_subset, "eval_size": cfg.eval_size})
    rows = []
    for backdoor in backdoors:
        model = backdoor.model(ctx)
        triggered, true_labels, attacked = purified_triggered(ctx, diffusion, backdoor)
        for stage, field in STAGES.items():
            clean_in = images if field is None else clean[field].to(ctx.device)
            attacked_in = triggered if field is None else attacked[field].to(ctx.device)
            rows.append({"model": backdoor.name, "stage": stage, "images": len(images),
                         "triggered_images": len(triggered),
                         **defence_metrics(ctx, model, clean_in, labels, attacked_in,
                                           true_labels, backdoor.target),
                         # measured on the clean images (the cost does not depend on them)
                         "seconds_per_image": clean["seconds_per_image"].get(stage, 0.0),
                         "diffusion": key})
    return rows


def trigger_levels(ctx: Context, backdoors: list) -> list:
    """Did stage 2 find the patch? Per patch-trigger model, over its triggered eval images:
    the mean stage-2 noise level (0..t2) of the pixels its trigger changed and of all other
    pixels, and the share of each at level t2/2 or above. A stage 2 that located the trigger
    gives its pixels the highest levels. Reads the purified images of sampdetox_rows (cached)."""
    diffusion = diffusion_model(ctx)
    images, labels = eval_subset(ctx)
    half = ctx.cfg.sampdetox.t2 / 2
    rows = []
    for backdoor in backdoors:
        triggered, _, attacked = purified_triggered(ctx, diffusion, backdoor)
        on = (triggered != images[labels != backdoor.target]).any(-1).cpu()    # (n, H, W)
        levels = attacked["levels"].float()
        rows.append({"model": backdoor.name, "trigger_pixels": int(on.sum()),
                     "level_on_trigger": float(levels[on].mean()),
                     "level_elsewhere": float(levels[~on].mean()),
                     "high_on_trigger": float((levels[on] >= half).float().mean()),
                     "high_elsewhere": float((levels[~on] >= half).float().mean())})
    return rows


# ---------------------------------------------------------------------------------------------
# SampDetox beside the defences of 04

def defences_side_by_side(ctx: Context, backdoors: list, blended: Backdoor,
                          detox) -> "pd.DataFrame":
    """06's comparison: per defence, what it needs (model access, clean data, cost at training
    and at inference, from the config and the measured times) and what it achieved: mean
    after-defence ASR over the patch-trigger models with its 95% interval, the mean change of
    clean accuracy (points), the blended model's ASR after it, and the images evaluated on.

    detox: the rows of sampdetox_rows for `backdoors` and `blended`. The retraining defences
    come from defense.compare_defenses (04's runs, cached; each run on the whole eval split;
    interval: bootstrap over runs); SampDetox's ASR interval is Wilson's over all triggered
    images of the patch models together. MESA models 3x3 patches: it has no blended entry."""
    import pandas as pd

    from .analysis import summarize
    from .defense import compare_defenses
    cfg = ctx.cfg
    runs = pd.DataFrame([row for b in backdoors for row in compare_defenses(ctx, b)])
    summary = summarize(runs).set_index("method")
    retraining = (f"+ {cfg.defense.epochs} retraining epochs on the defender's "
                  f"{len(ctx.splits.defense_images):,} images")
    white_box = "white-box: gradients through the model, then its weights retrained"
    own_data = f"the defender's {len(ctx.splits.defense_images):,} clean images"
    rows = []
    for method, label, training in (
            ("mesa_mixture", "MESA (mixture of the staircase)",
             f"{len(cfg.mesa.betas)} generators x {cfg.mesa.steps} steps {retraining}"),
            ("baseline", "single reversed trigger (baseline)",
             f"{cfg.baseline.starts} reversals x {cfg.baseline.steps} steps, each {retraining}"),
            ("neural_cleanse", "Neural Cleanse",
             f"{ctx.splits.num_classes} masks x {cfg.neural_cleanse.steps} steps {retraining}"),
            ("ideal", "ideal (retrained with the true trigger)", f"the true trigger {retraining}")):
        part = summary.loc[method]
        rows.append({"defence": label, "model_access": white_box, "clean_data": own_data,
                     "training_cost": training, "inference_cost": "none",
                     "patch_asr_%": part["mean_asr_%"], "patch_asr_low_%": part["mean_asr_low_%"],
                     "patch_asr_high_%": part["mean_asr_high_%"],
                     "clean_change_pts": part["clean_change_pts"], "blended_asr_%": None,
                     "evaluated_on": f"eval split ({len(ctx.splits.eval_images):,} images), "
                                     f"{int(part['runs'])} runs"})
    patch = detox[detox.model != blended.name]
    names = [b.name for b in backdoors]
    _, _, record = diffusion_model(ctx)
    scfg = cfg.sampdetox
    for stage, label in (("none", "no defence"), ("SampDetox", "SampDetox")):
        rows_stage = patch[(patch.stage == stage) & patch.model.isin(names)]
        hits = (rows_stage.asr * rows_stage.triggered_images).round().sum()
        total = rows_stage.triggered_images.sum()
        low, high = wilson_interval(int(hits), int(total))
        none = patch[(patch.stage == "none") & patch.model.isin(names)]
        blended_row = detox[(detox.model == blended.name) & (detox.stage == stage)].iloc[0]
        purifying = stage == "SampDetox"
        rows.append({
            "defence": label,
            "model_access": "none: black-box, inputs only" if purifying else "",
            "clean_data": (f"{len(ctx.splits.train_images):,} clean training images (for the "
                           f"diffusion model)") if purifying else "",
            "training_cost": (f"diffusion model: {scfg.train_steps:,} steps x {scfg.batch_size} "
                              f"images ({record['train_seconds'] / 60:.0f} min on this run's "
                              f"machine)") if purifying else "",
            "inference_cost": (f"{scfg.t1 + scfg.t2} UNet passes per input "
                               f"({rows_stage.seconds_per_image.mean():.2f} s an image on this "
                               f"run's machine)") if purifying else "none",
            "patch_asr_%": 100 * hits / total, "patch_asr_low_%": 100 * low,
            "patch_asr_high_%": 100 * high,
            "clean_change_pts": 100 * (rows_stage.ca.to_numpy() - none.ca.to_numpy()).mean(),
            "blended_asr_%": 100 * blended_row.asr,
            "evaluated_on": f"first {int(rows_stage.images.iloc[0]):,} eval images "
                            f"({int(total):,} triggered)"})
    return pd.DataFrame(rows).round(2)
