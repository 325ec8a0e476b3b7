"""Train a GAN that draws faces: facenets' recipe (the defaults), the Concepción report's DCGAN or Radford et al.'s
DCGAN, on face crops (CelebA's, or any folder or .zip of face images) or built-in synthetic faces; or write a trained
generator's images as PNG files.

    python train_gan.py --data synthetic --epochs 1 # a complete run folder, a check of the machinery: 7 steps draw
                                                    # 64 alike grey noise squares, no faces yet
    make gan DATA=data/celeba-faces                 # the recipe: DCGAN generator with its weight average, a
                                                    # spectral-norm discriminator, hinge loss, two learning rates,
                                                    # DiffAugment
    make gan-cpu DATA=data/celeba-faces             # the recipe at width 32 for 45 minutes in bf16: on 12,476 CelebA
                                                    # faces, one CPU core with AMX, 99% of its images hold a face
                                                    # (MTCNN), Fréchet 0.19
    make dcgan-concepcion DATA=data/celeba-faces    # the Concepción report's Keras DCGAN: BCE, Adam 1e-4, batch 32,
                                                    # 30 epochs; in the same 45 minutes: 20% faces, Fréchet 2.98,
                                                    # collapsed
    python train_gan.py --preset radford --data data/celeba-faces     # pytorch/examples' DCGAN, 25 epochs
    python train_gan.py --sample 5000 --checkpoint runs/gan/<run>/best.pt --out fakes/
                                                    # PNGs for pytorch-fid or torch-fidelity

What each reaches and how long it takes: see REPRODUCING.md. Every run writes runs/gan/<name>/: config.json, log.csv,
a grid of the same 64 latent vectors after every epoch (grid-epoch-001.png, ...: the report's "monitor"), last.pt,
best.pt, and at the end grid.png, interpolation.png, losses.png (G, D, D(real), D(fake)) and metrics.json. Quality is
measured against held-out images that are never trained on (--holdout), in the features of MTCNN's ONet (offline, so
NOT the Inception FID of papers: --sample writes images for that). First the headline scores, which fail on both mode
collapse and noise: a Fréchet distance, coverage and recall. Then diagnostics, each blind to one failure: precision
and density (a generator collapsed onto one real-looking face scores well on both), the share of faces (blind to
collapse onto a face) and of near-duplicates (blind to noise). best.pt is the check with the lowest Fréchet distance.
last.pt is rewritten every 30 s: --resume RUN_DIR continues a stopped or killed run exactly. Images are decoded once
into a cached uint8 tensor that sits on the training device. Exit status: 0 done, 2 bad input, 3 diverged (stopped,
the last good checkpoints kept), 130 stopped by Ctrl-C or SIGTERM (saved: --resume goes on).
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports below load (seconds): one line and status 130
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\nstopped while starting: nothing was written") or 130))
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))

import copy
import math
import shlex
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from facenets import augment, data, metrics, models, runs, training

# Each preset is the flags its source used; flags given on the command line still win.
PRESETS = {
    # Report 004 §3.2.4: its Keras models, binary cross-entropy, Adam lr 1e-4 for both (Keras' betas), batch 32, 30
    # epochs, images in [0, 1] (the generator's sigmoid), nothing else.
    "concepcion": dict(
        model="concepcion",
        loss="bce",
        lr_g=1e-4,
        lr_d=1e-4,
        betas=[0.9, 0.999],
        batch_size=32,
        epochs=30,
        ema=0.0,
        diffaugment="none",
        flip=False,
        spectral_norm=False,
    ),
    # pytorch/examples dcgan/main.py: BatchNorm in D, BCE, Adam 2e-4 with beta1 0.5, batch 64, 25 epochs, [-1, 1].
    "radford": dict(
        model="dcgan",
        loss="bce",
        lr_g=2e-4,
        lr_d=2e-4,
        betas=[0.5, 0.999],
        batch_size=64,
        epochs=25,
        ema=0.0,
        diffaugment="none",
        flip=False,
        spectral_norm=False,
    ),
}
HOLDOUT_SEED = 0  # the held-out images are the same for every --seed, so that runs compare on the same images
# The headline scores first (they fail on mode collapse and on noise alike), then the diagnostics.
QUALITY_KEYS = ("frechet_distance", "coverage", "recall", "precision", "density", "face_rate", "near_duplicates")
TRACE_EVERY = 20  # steps per point of losses.png (and per look at the losses, which waits for the GPU)
GRID_SEED, QUALITY_SEED, STATS_SEED = 1, 2, 3  # noise of the monitor grid, the quality checks, BatchNorm statistics
DIVERGED = runs.DIVERGED  # exit status of a run stopped because it diverged
ADVICE = "lower --lr-d / --lr-g, another --loss or --seed"  # what to try after a run diverged

# ----------------------------------------------------------------------------- flags


def build_parser():
    p = runs.FlagParser(
        __doc__,
        epilog="GANs: " + ", ".join(models.GANS) + f"; exit status {DIVERGED}: the run diverged "
        "(NaN losses, or D certain of every image for --diverge-steps steps) and stopped, keeping its last "
        "good last.pt and best.pt",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="data/celeba-faces",
        help="a folder of face images (subfolders are read too), e.g. "
        "celeba-faces/ or CelebA's img_align_celeba/ (centre square crop), a .zip of them, or 'synthetic'",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side of the square images the GAN draws: 64 (the reports); "
        "dcgan takes powers of two from 16, concepcion multiples of 16",
    )
    g.add_argument(
        "--holdout",
        type=int,
        default=5000,
        help="images held out and never trained on; quality is measured "
        "against them. The same images for every --seed; at most half of the images",
    )
    g.add_argument(
        "--synthetic-count",
        type=int,
        default=1000,
        help="number of faces for --data synthetic (held-out part included)",
    )
    g.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="a source's setup: concepcion (the report's Keras DCGAN, "
        "BCE, Adam 1e-4 with Keras' betas, batch 32, 30 epochs, images in [0, 1]) or radford (pytorch/examples' "
        "DCGAN: BCE, Adam 2e-4 with beta1 0.5, batch 64, 25 epochs); flags given explicitly still win",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="dcgan",
        choices=models.GANS,
        help="dcgan: Radford et al.'s generator and "
        "discriminator (pytorch/examples); concepcion: the report's Keras DCGAN, exactly",
    )
    g.add_argument(
        "--latent",
        type=int,
        default=None,
        help="size of the latent vector (default: the model's, dcgan 100, concepcion 64)",
    )
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="dcgan: channels of the generator's last and the discriminator's "
        "first layer (ngf = ndf, 64); 32 is 4x less compute",
    )
    g.add_argument(
        "--no-spectral-norm",
        dest="spectral_norm",
        action="store_false",
        help="no spectral normalisation "
        "in D (Miyato et al. 2018; it bounds how fast D's output can change, the usual cure for a D that "
        "overpowers G); dcgan's D then has Radford's BatchNorm",
    )

    g = p.add_argument_group("augmentation (what the discriminator sees, real and generated)")
    g.add_argument(
        "--diffaugment",
        default="color,translation,cutout",
        metavar="POLICY",
        help="DiffAugment (Zhao et "
        "al. 2020): the same kind of random colour, shift and cutout on every image D sees, real or generated, "
        "kept differentiable for G; it keeps D from memorising a data set of thousands. 'none': off",
    )
    g.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        help="no random mirroring of the real images "
        "(faces are near-symmetric, so mirroring doubles the data; StyleGAN's --mirror)",
    )

    g = p.add_argument_group("optimisation (Adam for both networks)")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training images; on --resume, a new total")
    g.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="real (and as many generated) images per step; under torchrun the global batch, each process "
        "taking its share",
    )
    g.add_argument(
        "--loss",
        default="hinge",
        choices=("hinge", "bce"),
        help="hinge: D pushes real logits above 1 and "
        "generated ones below -1, G raises D's logit of its images (SN-GAN, SAGAN, BigGAN); bce: the original "
        "GAN loss, cross-entropy on D's sigmoid with G trained to be called real (DCGAN, the Concepción report)",
    )
    g.add_argument("--lr-g", type=float, default=1e-4, help="generator learning rate")
    g.add_argument(
        "--lr-d",
        type=float,
        default=4e-4,
        help="discriminator learning rate: 4x G's is the two time-scale "
        "update rule (TTUR, Heusel et al. 2017) at SAGAN's values",
    )
    g.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=[0.0, 0.9],
        metavar=("B1", "B2"),
        help="Adam's betas for both (SAGAN's; DCGAN: 0.5 0.999, Keras' default: 0.9 0.999)",
    )
    g.add_argument(
        "--ema",
        type=float,
        default=0.999,
        help="also keep a moving average of the generator's weights with "
        "this decay per step; it draws the grids, the samples and is scored (Yazici et al. 2019); 0 = off",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seeds the weights, the batch order, the noise and the augmentation"
    )
    g.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="end training after this many "
        "minutes of training steps, in the middle of an epoch if need be, then the final pictures and quality "
        "as after the last epoch: compares recipes at equal compute (default: none, --epochs decides)",
    )

    g = p.add_argument_group("quality and divergence")
    g.add_argument(
        "--quality-every",
        type=int,
        default=5,
        help="measure quality every this many epochs and after the "
        "last (0: only at the end, best.pt is then the last epoch); needs facenet-pytorch",
    )
    g.add_argument(
        "--quality-count",
        type=int,
        nargs=2,
        default=[1000, 5000],
        metavar=("DURING", "END"),
        help="generated images per quality check during training, and at the end (each against as many "
        "held-out images, at most --holdout): the Fréchet distance depends on the count",
    )
    g.add_argument(
        "--diverge-steps",
        type=int,
        default=1000,
        help=f"stop with exit status {DIVERGED} when D tells every "
        "real from every generated image with certainty (99%%; beyond the hinge margin) for this many steps "
        "in a row; NaN losses stop at once",
    )
    runs.add_run_flags(p, out="runs/gan", task=None)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = runs.parse_flags(p, argv, PRESETS)
    if args.epochs < 1 or args.batch_size < 1 or args.lr_g <= 0 or args.lr_d <= 0:
        p.error("--epochs and --batch-size must be positive, --lr-g and --lr-d too")
    if not (0 <= args.betas[0] < 1 and 0 <= args.betas[1] < 1 and 0 <= args.ema < 1):
        p.error("--betas and --ema must each be in [0, 1)")
    if args.holdout < 10 or args.synthetic_count < 40 or min(args.quality_count) < 10 or args.quality_every < 0:
        p.error(
            "--holdout and --quality-count need at least 10 images each, --synthetic-count 40; "
            "--quality-every 0 or more"
        )
    if args.time_budget is not None and args.time_budget <= 0:
        p.error("--time-budget must be a positive number of minutes")
    if args.diverge_steps < 1 or (args.sample is not None and args.sample < 1):
        p.error("--diverge-steps and --sample must be at least 1")
    try:
        augment.diff_augment(torch.zeros(1, 3, 16, 16), args.diffaugment)
        given = {"latent": args.latent, "width": args.width}
        args.gan_options = models.check_gan_options(
            args.model, {"spectral_norm": args.spectral_norm, **{k: v for k, v in given.items() if v is not None}}
        )
    except ValueError as e:
        p.error(
            str(e)
            .replace("option width", "option width (--width)")
            .replace("option latent", "option latent (--latent)")
        )
    return args


# ----------------------------------------------------------------------------- data, images and losses


def load_faces(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, S, S] training images and the held-out ones, disjoint, said in one line; the held-out part is
    seeded apart from --seed."""
    t0 = time.perf_counter()
    if cfg["data"] == "synthetic":
        images = data.synthetic_attribute_faces(
            cfg["synthetic_count"], "celeba", cfg["image_size"], seed=cfg["seed"]
        ).images
    else:
        images = data.load_face_images(cfg["data"], cfg["image_size"], cfg["cache"]).images
    if len(images) < 40:
        raise data.DataError(
            f"{cfg['data']} holds {len(images)} readable images: a GAN needs thousands to learn faces "
            "(at least 40 to run)"
        )
    train, held_out = data.holdout_split(len(images), min(cfg["holdout"], len(images) // 2), HOLDOUT_SEED)
    print(
        f"data: {len(images)} faces from {cfg['data']} at {cfg['image_size']}x{cfg['image_size']} in "
        f"{time.perf_counter() - t0:.1f}s: {len(train)} to train on, {len(held_out)} held out"
    )
    return images[train], images[held_out]


def real_batch(images: torch.Tensor, cfg: dict, low: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 images -> floats in the generator's range [low, 1], mirrored at random with --flip."""
    x = images.float().div_(255)
    x = x * (1 - low) + low if low else x
    return augment.random_hflip(x, generator=gen) if cfg["flip"] else x


def pixels(x: torch.Tensor, low: float) -> torch.Tensor:
    """The generator's floats in [low, 1] -> uint8 images."""
    return ((x.float() - low) * (255 / (1 - low))).round_().clamp_(0, 255).to(torch.uint8)


def seen_by_d(x: torch.Tensor, cfg: dict, low: float, gen: torch.Generator) -> torch.Tensor:
    """What the discriminator sees of real or generated images: DiffAugment's draw, in the paper's [-1, 1]."""
    if cfg["diffaugment"] == "none":
        return x
    if low == 0:
        return augment.diff_augment(x * 2 - 1, cfg["diffaugment"], generator=gen) * 0.5 + 0.5
    return augment.diff_augment(x, cfg["diffaugment"], generator=gen)


def d_loss(real: torch.Tensor, fake: torch.Tensor, loss: str) -> torch.Tensor:
    """D's loss on its float logits of real and of generated images."""
    if loss == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # BCE of sigmoid(logit) with label 1 for real, 0 for fake


def g_loss(fake: torch.Tensor, loss: str) -> torch.Tensor:
    """G's loss on D's logits of its images: the non-saturating form of each (BCE with label 1)."""
    return -fake.mean() if loss == "hinge" else F.softplus(-fake).mean()


def certain(real: torch.Tensor, fake: torch.Tensor, loss: str) -> torch.Tensor:
    """True (a 0-dim tensor, no wait for the GPU) when D tells every real from every generated image with certainty:
    beyond the hinge margin, or 99% probability on its sigmoid."""
    margin = 1.0 if loss == "hinge" else math.log(99)
    return (real.min() > margin) & (fake.max() < -margin)


def check_memory(cfg: dict, device: torch.device):
    """training.check_memory for G and D at cfg's sizes: a size that cannot fit is refused before allocating it."""
    size = cfg["image_size"]
    networks = (
        (lambda: make_gan(cfg, "meta")[0], lambda g: [(g.latent,)]),
        (lambda: make_gan(cfg, "meta")[1], [(3, size, size)]),
    )
    training.check_memory(device, cfg["batch_size"], *networks)


def make_gan(cfg: dict, device: torch.device):
    try:
        g, d = models.build_gan(cfg["model"], cfg["image_size"], **cfg["gan_options"])
    except (TypeError, ValueError) as e:
        raise runs.RunError(f"model {cfg['model']}: {e}") from None
    return g.to(device), d.to(device)


@torch.no_grad()
def drawing_copy(generator: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """A copy of generator in eval mode to draw images with, its BatchNorm statistics measured anew on 256 latent
    vectors: an average of weights needs the statistics of its own activations, not an average of statistics
    ("standing statistics", Brock et al. 2019). The training generator and its state stay untouched."""
    g = copy.deepcopy(generator)
    norms = [m for m in g.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain mean over the batches below
        g.train()
        noise = torch.Generator().manual_seed(STATS_SEED)
        for _ in range(2):
            with training.autocast(device, precision):
                g(torch.randn(128, g.latent, generator=noise).to(device))
    return g.eval()


@torch.no_grad()
def draw(g: torch.nn.Module, z: torch.Tensor, precision: str, batch_size: int = 500) -> torch.Tensor:
    """uint8 images [N, 3, S, S] on the CPU from latent vectors z [N, latent], in batches."""
    out = []
    for part in z.split(batch_size):
        with training.autocast(part.device, precision):
            out.append(pixels(g(part), g.low).cpu())
    return torch.cat(out)


def noise(count: int, latent: int, seed: int, device: torch.device) -> torch.Tensor:
    """count latent vectors, the same for a seed on every device (drawn on the CPU)."""
    return torch.randn(count, latent, generator=torch.Generator().manual_seed(seed)).to(device)


def interpolation(latent: int, seed: int, device: torch.device, rows: int = 8, columns: int = 10) -> torch.Tensor:
    """rows x columns latent vectors: each row walks from one random vector to another along the great circle
    (slerp, White 2016), which keeps the norm that Gaussian latent vectors have, unlike a straight line."""
    a, b = noise(2 * rows, latent, seed, device).chunk(2)
    angle = torch.arccos((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1, keepdim=True).clamp(-1, 1))[:, None]
    t = torch.linspace(0, 1, columns, device=device)[None, :, None]
    walk = (torch.sin((1 - t) * angle) * a[:, None] + torch.sin(t * angle) * b[:, None]) / torch.sin(angle).clamp_min(
        1e-6
    )
    return walk.flatten(0, 1)


def quality(
    g: torch.nn.Module,
    held_out: torch.Tensor,
    count: int,
    device: torch.device,
    precision: str,
    train_images: torch.Tensor | None = None,
) -> dict | None:
    """metrics.gan_quality of count generated images against as many held-out ones; None (with a warning) where
    facenet-pytorch, which holds ONet's weights, is missing or the images cannot be scored: training goes on."""
    count = min(count, len(held_out))
    fakes = draw(g, noise(count, g.latent, QUALITY_SEED, device), precision)
    try:
        return metrics.gan_quality(fakes, held_out[:count], device=str(device), train_images=train_images)
    except (ImportError, ValueError) as e:
        warnings.warn(f"quality not measured: {e}")
        return None


def plot_losses(trace: list[dict], path: Path):
    points = {key: [(t["epoch"], t[key]) for t in trace] for key in ("g_loss", "d_loss", "d_real", "d_fake")}
    metrics.plot_lines(
        [
            ("loss", {"G": points["g_loss"], "D": points["d_loss"]}),
            ("D's probability of real", {"D(real)": points["d_real"], "D(fake)": points["d_fake"]}),
        ],
        path,
    )


# ----------------------------------------------------------------------------- samples for other tools


def sample(args):
    device = training.pick_device(args.device)
    ckpt = runs.load_checkpoint(args.checkpoint, map_location=device, needs=SAMPLE_KEYS)
    where, cfg = Path(args.checkpoint), ckpt["config"]
    if not {"model", "image_size", "gan_options"} <= cfg.keys():
        raise runs.RunError(f"{where} was not saved by train_gan.py: use a checkpoint from runs/gan/")
    g, _ = make_gan(cfg, device)
    with runs.loading(where, "weights"):
        g.load_state_dict(ckpt["ema"] or ckpt["model"])  # the averaged weights when the run kept them
    out = runs.make_folder(runs.predictions_folder(args, "samples"))
    if any(out.glob("*.png")):
        raise runs.RunError(
            f"{out} already holds PNG files: pick an empty --out, so that scores count only these images"
        )
    size = cfg["image_size"]
    need, free = args.sample * 3 * size * size, shutil.disk_usage(out).free  # a PNG holds at most about its pixels
    if need > free:
        raise runs.RunError(
            f"{args.sample:,} images of {size}x{size} take up to {need / 1e9:,.1f} GB and {out} has "
            f"{free / 1e9:,.1f} GB free: ask for fewer, or write them elsewhere with --out"
        )
    drawer, noise_source, written = (
        drawing_copy(g, device, args.precision),
        torch.Generator().manual_seed(args.seed),
        [],
    )
    try:
        for start in range(0, args.sample, 500):  # 500 latent vectors at a time: any count fits in memory
            z = torch.randn(min(500, args.sample - start), g.latent, generator=noise_source).to(device)
            for i, image in enumerate(draw(drawer, z, args.precision), start):
                written.append(
                    runs.replace_atomically(
                        out / f"{i:06d}.png",
                        lambda tmp: Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG"),
                    )
                )
    except (runs.RunError, KeyboardInterrupt):
        for path in written:  # a part of the set would be scored as if it were all of it
            path.unlink()
        raise
    print(
        f"wrote {args.sample} images of {cfg['image_size']}x{cfg['image_size']} from {where} (seed {args.seed}) "
        f"to {out}"
    )
    return 0


# ----------------------------------------------------------------------------- training

NOT_SAVED = runs.NOT_SETTINGS + ("sample", "preset", "latent", "spectral_norm")  # the last two: in gan_options
SAMPLE_KEYS = (
    "model",
    "config",
    "ema",
    "discriminator",
)  # what --sample needs of a checkpoint; to go on training, also:
RESUME_KEYS = runs.TRAINING_STATE + ("discriminator", "d_optimizer", "trace", "best_frechet", "streak")


def train(args, command: str):
    device = training.pick_device(args.device)
    training.keep_freed_memory()
    run = runs.Run(args, command, device, RESUME_KEYS, NOT_SAVED, "best_frechet", lower_is_better=True, advice=ADVICE)
    cfg = run.cfg
    training.suggest_precision(device, cfg["precision"])
    check_memory(cfg, device)
    g, d = make_gan(cfg, device)  # before the data: a wrong size is said at once
    x_train, held_out = load_faces(cfg)
    x_train = x_train.to(device)
    batch_size, steps = run.batching(len(x_train))
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg["lr_g"], betas=tuple(cfg["betas"]))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg["lr_d"], betas=tuple(cfg["betas"]))
    average = training.WeightAverage(g, cfg["ema"]) if cfg["ema"] else None
    ema = None if average is None else average.module
    evaluated = g if ema is None else ema  # the average draws the grids, is scored and sampled
    trace = run.saved("trace", [])  # the losses every TRACE_EVERY steps, for losses.png
    streak = torch.tensor(run.saved("streak", 0), device=device)  # steps in a row D has been certain of everything
    run.start(
        f"{cfg['model']}-{datetime.now():%Y%m%d-%H%M%S}",
        {"model": g, "discriminator": d, "ema": ema, "optimizer": opt_g, "d_optimizer": opt_d, "scheduler": None},
        data=x_train,
        keep={"trace": trace, "streak": streak},
        plot=lambda: plot_losses(trace, run.folder / "losses.png"),
    )
    print(
        f"model: {cfg['model']} {cfg['gan_options']}, G {models.count_parameters(g):,} and D "
        f"{models.count_parameters(d):,} parameters, {cfg['loss']} loss, on {device}"
    )
    step_g, step_d = (training.compiled(g, device), training.compiled(d, device)) if cfg["compile"] else (g, d)
    low, fixed, gen = g.low, noise(64, g.latent, GRID_SEED, device), run.augment_generator
    quality_ok = True

    for epoch in run.epochs():
        g.train()
        d.train()
        # G loss, D loss, D(real), D(fake), summed on the device over the epoch and since the last trace point
        sums = run.epoch_sums(totals=4, window=4)
        for step, idx in run.batches():
            real = real_batch(x_train[idx], cfg, low, gen)
            z = torch.randn(len(idx), g.latent, device=device, generator=gen)
            # D step: real images against generated ones (which G's step below reuses)
            with training.autocast(device, cfg["precision"]):
                fake = step_g(z)
                real_logits = step_d(seen_by_d(real, cfg, low, gen)).float()
                fake_logits = step_d(seen_by_d(fake.detach(), cfg, low, gen)).float()
            loss_d = d_loss(real_logits, fake_logits, cfg["loss"])
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            run.average_gradients(d)  # under torchrun: every process's (D runs thrice a step, so not DDP)
            opt_d.step()
            # G step: the updated D's verdict on the same generated images; D's weights need no gradient here
            d.requires_grad_(False)
            with training.autocast(device, cfg["precision"]):
                loss_g = g_loss(step_d(seen_by_d(fake, cfg, low, gen)).float(), cfg["loss"])
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            run.average_gradients(g)
            opt_g.step()
            d.requires_grad_(True)
            if average is not None:
                average.update(done=epoch * steps + step + 1)
            # Bookkeeping on the device; the host looks only every TRACE_EVERY steps (that waits for the GPU).
            stats = torch.stack([loss_g, loss_d, real_logits.sigmoid().mean(), fake_logits.sigmoid().mean()]).detach()
            sums["totals"] += stats
            sums["window"] += stats
            streak.add_(1).mul_(certain(real_logits.detach(), fake_logits.detach(), cfg["loss"]))
            if (step + 1) % TRACE_EVERY == 0 or step + 1 == steps:
                watch(run, trace, sums["window"], streak, step, cfg)
        means = (sums["totals"] / (run.steps_done * run.world_size)).tolist()  # over every process's steps
        row = {
            "epoch": epoch + 1,
            **{k: round(v, 5) for k, v in zip(("g_loss", "d_loss", "d_real", "d_fake"), means)},
            **dict.fromkeys(QUALITY_KEYS),
            "seconds": round(run.seconds, 2),
            "images_per_second": round(run.steps_done * batch_size / run.seconds, 1),
        }
        # The monitor grid of every epoch, and the quality every --quality-every epochs and after the last
        due = quality_ok and cfg["quality_every"] and ((epoch + 1) % cfg["quality_every"] == 0 or run.is_last_epoch())
        count = (64 if cfg["dry_run"] else cfg["quality_count"][0]) if due else 0
        grid = run.folder / f"grid-epoch-{epoch + 1:03d}.png"
        measured = run.on_main(lambda: look(evaluated, fixed, held_out, grid, count, cfg))
        quality_ok = not due or measured is not None  # facenet-pytorch, which holds ONet's weights, may be missing
        row.update({k: round(measured[k], 5) for k in QUALITY_KEYS} if measured else {})
        print(
            f"epoch {epoch + 1:3d}  G loss {means[0]:.4f}  D loss {means[1]:.4f}  D(real) {means[2]:.3f}  D(fake) "
            f"{means[3]:.3f}{headline(measured)}  {run.seconds:.1f}s  {row['images_per_second']:.0f} img/s"
        )
        run.end_epoch(row, score=measured["frechet_distance"] if measured else None)

    if not run.is_main:  # under torchrun process 0 alone draws, scores and writes the results
        return 0
    # The chosen generator: its pictures, then its quality on more images (and what real images reach).
    best = run.best_weights(model=g, ema=ema)
    drawer = drawing_copy(evaluated, device, cfg["precision"])
    final_pictures(drawer, fixed, trace, run.folder, cfg["precision"])
    final = final_quality(drawer, x_train, held_out, cfg, device) if quality_ok else None
    images_per_second = sum(h["images_per_second"] * h["seconds"] for h in run.history) / max(run.train_seconds, 1e-9)
    result = run.finish(
        {
            "quality": final,
            "best_epoch": best["epoch"],
            "best_frechet_during_training": run.best if math.isfinite(run.best) else None,
            "images_per_second": round(images_per_second, 1),
            "parameters": {"generator": models.count_parameters(g), "discriminator": models.count_parameters(d)},
            "images": {"train": len(x_train), "held_out": len(held_out)},
        }
    )
    print(
        f"{summary(final)}, with the generator of epoch {best['epoch']}; training took {run.train_seconds:.0f}s on "
        f"{result['device']}; results in {run.folder}"
    )
    return 0


def look(evaluated, fixed: torch.Tensor, held_out: torch.Tensor, grid: Path, count: int, cfg: dict) -> dict | None:
    """The epoch's monitor grid of the fixed latent vectors, and its quality on count images (0: not this epoch)."""
    drawer = drawing_copy(evaluated, fixed.device, cfg["precision"])
    metrics.save_image_grid(draw(drawer, fixed, cfg["precision"]), grid)
    return quality(drawer, held_out, count, fixed.device, cfg["precision"]) if count else None


def summary(final: dict | None) -> str:
    """The final quality in words: the headline scores, then the diagnostics."""
    if not final:
        return "quality not measured"
    return (
        f"Fréchet distance {final['frechet_distance']:.2f} (real vs real {final['real_vs_real_frechet']:.2f}), "
        f"coverage {final['coverage']:.3f}, recall {final['recall']:.3f} (diagnostics: precision "
        f"{final['precision']:.3f}, faces {final['face_rate']:.3f}, near-duplicates "
        f"{final['near_duplicates']:.3f}) on {final['fake_count']} images"
    )


def headline(measured: dict | None) -> str:
    """The headline scores of a quality check for the epoch's line: those that fail on collapse and on noise."""
    if not measured:
        return ""
    return (
        f"  Fréchet {measured['frechet_distance']:.2f} coverage {measured['coverage']:.3f} "
        f"recall {measured['recall']:.3f}"
    )


def final_pictures(drawer, fixed: torch.Tensor, trace: list, folder: Path, precision: str):
    """The chosen generator's grid of the fixed latent vectors, its interpolations, and the losses."""
    metrics.save_image_grid(draw(drawer, fixed, precision), folder / "grid.png")
    walks = interpolation(drawer.latent, GRID_SEED, fixed.device)
    metrics.save_image_grid(draw(drawer, walks, precision), folder / "interpolation.png", columns=10)
    plot_losses(trace, folder / "losses.png")


def final_quality(drawer, x_train: torch.Tensor, held_out: torch.Tensor, cfg: dict, device) -> dict | None:
    """quality on the end's count of images, with what as many training images reach against the held-out ones."""
    count = min(64 if cfg["dry_run"] else cfg["quality_count"][1], len(held_out), len(x_train))
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(QUALITY_SEED))[:count]
    return quality(drawer, held_out, count, device, cfg["precision"], train_images=x_train[pick.to(device)].cpu())


def watch(run, trace: list, window: torch.Tensor, streak: torch.Tensor, step: int, cfg: dict):
    """Every TRACE_EVERY steps: a point of losses.png from the window's means, and a stop where the run diverged."""
    # every process's window, so that all see the same losses and stop at the same step
    means = (run.reduced(window) / ((step % TRACE_EVERY + 1) * run.world_size)).tolist()
    window.zero_()
    trace.append(
        {
            "epoch": round(run.epoch + (step + 1) / run.steps, 4),
            **dict(zip(("g_loss", "d_loss", "d_real", "d_fake"), means)),
        }
    )
    where = f"in epoch {run.epoch + 1} by step {step + 1}"
    if not all(map(math.isfinite, means)):
        run.diverged("the losses are NaN or infinite", where)
    certain_for = int(run.reduced(streak, op=torch.distributed.ReduceOp.MIN))  # in every process
    if certain_for >= cfg["diverge_steps"]:
        run.diverged(
            f"D has told every real from every generated image with certainty for {certain_for} steps: G has lost",
            where,
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sample:
        return runs.one_line_errors(lambda: sample(args), data.DataError)
    typed = sys.argv[1:] if argv is None else list(argv)
    return runs.one_line_errors(lambda: train(args, shlex.join(["train_gan.py", *typed])), data.DataError)


if __name__ == "__main__":
    sys.exit(main())
