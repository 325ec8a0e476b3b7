"""Benchmark facenets' training loop against a standard DataLoader loop, and time the recipe to 70% and 72%.

What it measures, in one run on one machine:
  1. Throughput: the same model trained for the same steps (same optimizer, batch size, augmentation) two ways,
       facenets   the whole set on the device as uint8, batches picked by index and augmented there in one go;
       reference  a Dataset applying torchvision.transforms.v2 to one image at a time, in --workers DataLoader workers.
  2. Time to accuracy: the recipe (train_emotion's defaults, weight average and mixup included) on all Training
     images, tested on PublicTest after every epoch.

    make bench DATA=data/fer2013                                          # both parts, 100 epochs
    python benchmarks/bench_emotion.py --data data/fer2013 --epochs 0     # throughput only
    python benchmarks/bench_emotion.py --small                            # CPU smoke run on synthetic faces

It prints the device, torch version and settings; images/s of each loop and the ratio facenets / reference;
PublicTest accuracy after each epoch; the training time (evaluation excluded) at which accuracy first reached
70% and 72%, and the final accuracy. --out FILE also writes every result as JSON.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

# benchmarks/ is not a package: put the repository root on the path so that train_emotion imports from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_emotion  # noqa: E402
from facenets import data, models, runs, training  # noqa: E402

TARGETS = (0.70, 0.72)
# What both throughput loops do: the recipe's random 40x40 crop, flip, erasing 0.25 and mixup, plus an affine
# (rotation +-10 degrees, scale 0.9-1.1, shift 10%), the heaviest per-image work a user is likely to turn on.
THROUGHPUT_AUGMENT = ["--rotate", "10", "--zoom", "0.1", "--translate", "0.1", "--shear", "0", "--erasing", "0.25"]
SMALL = dict(data="synthetic", synthetic_count=1000, batch_size=64, steps=10, warmup=2, epochs=2, workers=2)


def build_parser():
    p = runs.FlagParser(__doc__)
    p.add_argument("--data", default="data/fer2013", help="FER2013 (image folders, .zip or .csv), or 'synthetic'")
    p.add_argument("--synthetic-count", type=int, default=4000, help="faces for --data synthetic (80%% Training)")
    p.add_argument("--model", default="vgg", choices=models.MODELS, metavar="NAME", help="as in train_emotion.py")
    p.add_argument("--width", type=int, default=None, help="channels of the first stage of vgg; None: its own, 64")
    p.add_argument("--batch-size", type=int, default=512, help="images per step, in both parts")
    p.add_argument("--steps", type=int, default=100, help="timed steps of each throughput loop")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (worker start, compilation, caches)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the reference loop: min(8, CPU cores)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: the GPU when there is one")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both parts")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the time-to-accuracy part; 0 skips it")
    p.add_argument(
        "--small",
        action="store_true",
        help="CPU smoke run; flags given explicitly still win. Sets "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMALL.items())
        + ", and --width 8 for vgg",
    )
    p.add_argument("--out", default=None, help="also write every result to this JSON file")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.small:  # parse again with the small defaults, so that explicitly given flags still win
        p.set_defaults(**SMALL)
        args = p.parse_args(argv)
        if args.model == "vgg" and args.width is None:  # other models have no width option
            args.width = 8
    if args.batch_size < 1 or args.steps < 1 or (args.width is not None and args.width < 1):
        p.error("--batch-size, --steps and --width must be positive")
    if min(args.warmup, args.workers, args.epochs) < 0:
        p.error("--warmup, --workers and --epochs must be 0 or more")
    return args


def recipe(args, *flags):
    """train_emotion's settings (its defaults are the recipe) on all Training images, with `flags` changed."""
    flags = [*flags, *(["--width", str(args.width)] if args.width else []), *(["--compile"] if args.compile else [])]
    return vars(
        train_emotion.parse_args(
            [
                "--data",
                args.data,
                "--synthetic-count",
                str(args.synthetic_count),
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--val-fraction",
                "0",
                *flags,
            ]
        )
    )


def new_model(cfg, faces, device):
    torch.manual_seed(cfg["seed"])  # the same initial weights in every loop
    image_size = (
        cfg["crop"] or faces.images.shape[-1]
    )  # the recipe trains on crops: a model's head may depend on the size
    model = train_emotion.make_model(cfg, faces.images.shape[1], len(faces.classes), image_size, device)
    return model, (training.compiled(model, device) if cfg["compile"] else model)


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work runs asynchronously: without this the clock reads only queued work
    return time.perf_counter()


def facenets_batches(images, labels, cfg, gen):
    """facenets' way, endlessly: uint8 images already on the device, picked by index and augmented as one batch."""
    steps = len(images) // cfg["batch_size"]  # the ragged last batch is dropped, as in train_emotion.py
    while True:
        order = torch.randperm(len(images), device=images.device, generator=gen)
        for idx in order[: steps * cfg["batch_size"]].view(steps, -1):
            yield train_emotion.augment_batch(train_emotion.model_input(images[idx], cfg), cfg, gen), labels[idx]


class OneImageAtATime(torch.utils.data.Dataset):
    """The reference way: each uint8 image augmented on its own by torchvision transforms, in a worker process."""

    def __init__(self, images, labels, cfg):
        self.images, self.labels = images, labels
        # As close to augment_batch as torchvision goes. Still different: one scale for both axes (facenets draws
        # x and y apart, as Keras did), zeros in the corners (facenets repeats the edge pixels) and normal noise in
        # the erased box (facenets: uniform in [0, 1]). That changes how images look, hardly the work per image.
        crop = [v2.RandomCrop(cfg["crop"])] if cfg["crop"] else []
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomAffine(
                    cfg["rotate"],
                    translate=(cfg["translate"],) * 2,
                    scale=(1 - cfg["zoom"], 1 + cfg["zoom"]),
                    interpolation=v2.InterpolationMode.BILINEAR,
                ),  # bilinear as facenets (default: nearest)
                *crop,
                v2.RandomHorizontalFlip(0.5 if cfg["flip"] else 0.0),
                v2.ToDtype(torch.float32, scale=True),
                v2.RandomErasing(cfg["erasing"], value="random"),
            ]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def reference_batches(images, labels, cfg, workers, device):
    loader = torch.utils.data.DataLoader(
        OneImageAtATime(images, labels, cfg),
        cfg["batch_size"],
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def images_per_second(batches, cfg, faces, args, device):
    model, step_model = new_model(cfg, faces, device)
    optimizer = training.make_optimizer(model, cfg)
    gen = torch.Generator(device).manual_seed(cfg["seed"])  # for mixup, the same draws in both loops
    for _ in range(args.warmup):
        train_emotion.train_step(step_model, optimizer, *next(batches), cfg, gen)
    start = clock(device)
    for _ in range(args.steps):
        train_emotion.train_step(step_model, optimizer, *next(batches), cfg, gen)
    seconds = clock(device) - start
    batches.close()  # stops the DataLoader's workers now, not whenever the garbage collector gets to them
    return args.steps * cfg["batch_size"] / seconds


def time_to_accuracy(x, y, x_test, y_test, cfg, faces, device):
    """The recipe for cfg["epochs"] epochs, tested after each one.

    This is a benchmark: the test accuracy is only reported over time, nothing (model, epoch, setting) is chosen by it.
    """
    model, step_model = new_model(cfg, faces, device)
    steps = len(x) // cfg["batch_size"]
    optimizer = training.make_optimizer(model, cfg)
    scheduler = training.make_scheduler(optimizer, cfg, steps)
    gen = torch.Generator(device).manual_seed(cfg["seed"])
    batches = facenets_batches(x, y, cfg, gen)
    average = training.WeightAverage(model, cfg["ema"]) if cfg["ema"] else None
    history, reached, seconds, done = [], {f"{t:.2f}": None for t in TARGETS}, 0.0, 0
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        start = clock(device)
        for _ in range(steps):
            train_emotion.train_step(step_model, optimizer, *next(batches), cfg, gen)
            done += 1
            if average is not None:
                average.update(done)
            scheduler.step()
        seconds += clock(device) - start  # the evaluation below is not training time
        accuracy = (
            (train_emotion.predict_proba(model if average is None else average.module, x_test, cfg).argmax(1) == y_test)
            .float()
            .mean()
            .item()
        )
        history.append({"epoch": epoch, "train_seconds": round(seconds, 2), "test_accuracy": round(accuracy, 5)})
        print(f"epoch {epoch:3d}/{cfg['epochs']}  training {seconds:7.1f} s  PublicTest accuracy {accuracy:.4f}")
        for target in TARGETS:
            if accuracy >= target and reached[f"{target:.2f}"] is None:
                reached[f"{target:.2f}"] = {"epoch": epoch, "train_seconds": round(seconds, 2)}
    return {
        "epochs": cfg["epochs"],
        "train_images": len(x),
        "test_images": len(x_test),
        "reached": reached,
        "final_accuracy": history[-1]["test_accuracy"],
        "train_seconds": round(seconds, 2),
        "history": history,
    }


def bench(args):
    device = training.pick_device(args.device)
    if args.out:  # refused now, not after minutes of measuring
        if Path(args.out).is_dir():
            raise runs.RunError(
                f"--out {args.out} is a folder: name the JSON file to write, e.g. {Path(args.out) / 'bench.json'}"
            )
        runs.make_folder(Path(args.out).parent)
    training.keep_freed_memory()  # set for the whole process, so both loops run with it
    cfg = recipe(args, *THROUGHPUT_AUGMENT)
    faces = train_emotion.load_faces(cfg)
    train = faces.usage == data.USAGES.index("Training")
    test = faces.usage == data.USAGES.index("PublicTest")
    if not train.any() or not test.any():
        raise data.DataError(f"{args.data} needs Training and PublicTest images: use the Kaggle folders or fer2013.csv")
    x, y = faces.images[train], faces.labels[train]
    if len(x) < args.batch_size:
        raise runs.RunError(f"--batch-size {args.batch_size} is more than the {len(x)} Training images: lower it")
    x_on_device, y_on_device = x.to(device), y.to(device)  # facenets' way: the whole training set on the device
    device_name = runs.device_name(device)
    model_name = " ".join([args.model, *(f"{k}={v}" for k, v in cfg["model_options"].items())])
    print(
        f"device {device_name}, torch {torch.__version__}; data {args.data}: "
        f"{len(x):,} Training, {int(test.sum()):,} PublicTest images"
    )
    print(
        f"model {model_name}; batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up steps; "
        f"reference with {args.workers} DataLoader workers\n"
    )

    gen = torch.Generator(device).manual_seed(cfg["seed"])
    speed = {
        "facenets": images_per_second(facenets_batches(x_on_device, y_on_device, cfg, gen), cfg, faces, args, device),
        "reference": images_per_second(reference_batches(x, y, cfg, args.workers, device), cfg, faces, args, device),
    }
    ratio = speed["facenets"] / speed["reference"]
    print(f"{'loop':40s} {'images/s':>9s}")
    print(f"{'facenets (uint8 on device, batched)':40s} {speed['facenets']:9.0f}")
    print(f"{f'reference (DataLoader, {args.workers} workers)':40s} {speed['reference']:9.0f}")
    print(f"{'ratio facenets / reference':40s} {ratio:8.2f}x")
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "settings": vars(args),
        "images_per_second": speed,
        "ratio": ratio,
        "time_to_accuracy": None,
    }

    if args.epochs:
        print(
            f"\ntime to accuracy: the recipe for {args.epochs} epochs on all Training images, PublicTest tested "
            "after each epoch (reported only: it selects nothing)"
        )
        x_test, y_test = faces.images[test].to(device), faces.labels[test].to(device)
        found = time_to_accuracy(
            x_on_device, y_on_device, x_test, y_test, recipe(args, "--epochs", str(args.epochs)), faces, device
        )
        for target, hit in found["reached"].items():
            when = f"{hit['train_seconds']:.1f} s of training (epoch {hit['epoch']})" if hit else "not reached"
            print(f"{float(target):.0%}: {when}")
        print(
            f"final: {found['final_accuracy']:.4f} after {args.epochs} epochs, {found['train_seconds']:.1f} s training"
        )
        results["time_to_accuracy"] = found
    if args.out:
        runs.write_json(args.out, results)  # written to a temporary name, then renamed: never half a file
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return bench(args)
    except (data.DataError, runs.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C): nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
