"""Train a facial-emotion classifier (7 classes) on FER2013, on faces cropped from your photos, or on
built-in synthetic faces; or run a trained model on photos.

    make demo                                              # 4 epochs on synthetic faces: 100%, 36 s on 2 CPU cores
    python train_emotion.py --data data/fer2013 --compile  # the recipe (the defaults), = make emotion: 71.1% on
                                                           # PublicTest (3 seeds: 70.3-71.9%), 36 s training on an H100
    make emotion-cpu DATA=data/fer2013                     # 64.4% on PublicTest in 24-25 minutes on 2 CPU cores
    make monterrey DATA=data/fer2013                       # a report's experiment: 52-53% (by CPU), 3-4 min, 2 cores
    python train_emotion.py --predict photo.jpg --checkpoint runs/emotion/<run>/best.pt
    python train_emotion.py --data data/fer2013 --compile --ensemble 4       # 4 networks at once; test: their mean
    python train_emotion.py --data data/fer2013 --compile --distill runs/emotion/<ensemble run>/best.pt

Every run writes runs/emotion/<name>/: config.json, log.csv, curves.png, last.pt, best.pt, and at the end
metrics.json (test accuracy, per-class table, accuracy by FER2013 Usage) and confusion.png. last.pt is rewritten every
30 s, so a killed run loses at most that: --resume RUN_DIR continues it exactly. The whole training set
sits on the training device as uint8 and is augmented there in batches: no DataLoader, no workers.
REPRODUCING.md has every report's experiment (exact command, what it reaches, how long it takes) and how the
recipe was chosen.
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports below load (seconds): one line and status 130
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\nstopped while starting: nothing was written") or 130))
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))

import shlex
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from facenets import augment, data, metrics, models, runs, training

# ----------------------------------------------------------------------------- flags


def build_parser():
    p = runs.FlagParser(__doc__, epilog="models: " + ", ".join(models.MODELS))
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="data/fer2013",
        help="FER2013 image folders, the Kaggle .zip, fer2013.csv / icml_face_data.csv, "
        "a folder of photos per class (with --crop-faces), or 'synthetic'",
    )
    g.add_argument(
        "--crop-faces",
        action="store_true",
        help="--data holds photos in <class>/ folders: crop the faces with MTCNN first (UTEC report)",
    )
    g.add_argument("--synthetic-count", type=int, default=4000, help="number of faces for --data synthetic")
    g.add_argument(
        "--split",
        default="official",
        choices=data.SPLITS,
        help="official: Training vs test images; publictest: PublicTest "
        "is validation, PrivateTest test; monterrey / udine / utec: the reports' own protocols",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="with --split official: stratified share of Training held out for validation and model selection "
        "(0 = none: best.pt is the last epoch)",
    )

    g = p.add_argument_group("model and input")
    example = "inceptions=30 multiplier=3 dropout=0.62 for udine_r2, downsample=stride for rna_cifar"
    runs.add_model_flags(g, models.MODELS, example)
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="rna_resnet50 / rna_resnet152: start from torchvision's ImageNet weights (needs them downloaded)",
    )
    g.add_argument(
        "--sobel-channels",
        action="store_true",
        help="feed gray, sobel magnitude and histogram-equalised gray as 3 channels (Udine report)",
    )
    g.add_argument(
        "--brightness", type=float, default=0.0, help="brightness added to every image, train and test (UTEC report)"
    )
    g.add_argument(
        "--contrast", type=float, default=1.0, help="contrast factor for every image, train and test (UTEC report)"
    )

    g = p.add_argument_group("augmentation (training batches only, on the training device)")
    g.add_argument("--rotate", type=float, default=0.0, help="random rotation, +- degrees")
    g.add_argument(
        "--shear", type=float, default=0.0, help="random shear, +- degrees (Keras shear_range is degrees too)"
    )
    g.add_argument("--zoom", type=float, default=0.0, help="random zoom, scale in [1-z, 1+z] (Keras zoom_range)")
    g.add_argument("--translate", type=float, default=0.0, help="random shift, +- fraction of the image size")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    g.add_argument(
        "--crop",
        type=int,
        default=40,
        help="train on random CROPxCROP crops, evaluate the centre crop (or --tta tencrop); 0 = off",
    )
    g.add_argument(
        "--cutout", type=int, default=0, help="zero one random CUTOUTxCUTOUT square per image (Trabajo final RNA: 8)"
    )
    g.add_argument("--erasing", type=float, default=0.25, help="probability of random erasing per image")
    g.add_argument("--mixup", type=float, default=0.2, help="mixup with lambda ~ Beta(a, a) per batch; 0 = off")
    g.add_argument(
        "--mixup-lam",
        type=float,
        default=None,
        help="mixup with this fixed share of the first image (Trabajo final RNA: 0.7)",
    )
    g.add_argument(
        "--cutmix",
        type=float,
        default=0.0,
        help="cutmix instead of mixup: paste a box of another image into each, of area "
        "~ Beta(a, a); 0 = off (with --mixup 0)",
    )
    g.add_argument(
        "--no-augment",
        action="store_true",
        help="turn off rotation, shear, zoom, shift, flip, cutout, erasing, mixup and cutmix; --crop stays as "
        "given (the Monterrey report used none)",
    )
    g.add_argument(
        "--tta",
        default="tencrop",
        choices=("none", "flip", "tencrop"),
        help="test-time augmentation; tencrop needs --crop",
    )

    g = training.add_optimizer_flags(p, epochs=100, batch_size=512, lr=0.2, label_smoothing=0.1, ema=0.999)
    g.add_argument(
        "--sam",
        type=float,
        default=0.0,
        help="sharpness-aware minimisation with this radius rho (e.g. 0.05): "
        "each step takes the gradient at weights moved rho uphill; twice the compute per step; 0 = off",
    )
    g.add_argument(
        "--stop-loss",
        type=float,
        default=0.0,
        help="stop once the training loss of an epoch is at or below this (UTEC report); 0 = off",
    )
    g = p.add_argument_group("ensemble and distillation")
    g.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="train N networks at once, as one network of grouped "
        "layers; each has its own initial weights, batch order and augmentation; tests and --predict average "
        f"their softmaxes ({' and '.join(models.STACKABLE)})",
    )
    g.add_argument(
        "--distill",
        metavar="CKPT",
        default=None,
        help="train on the softened outputs of this train_emotion.py "
        "checkpoint (e.g. an --ensemble run's best.pt) beside the labels, computed on each augmented batch",
    )
    # T = 4 as in the usual knowledge-distillation baselines (e.g. Tian et al. 2020). Hinton et al. (2015) weigh the
    # teacher most, but a FER2013 teacher is wrong on about one image in four: the labels keep half the say.
    g.add_argument(
        "--distill-weight",
        type=float,
        default=0.5,
        metavar="A",
        help="share of the loss given to the teacher: (1 - A) * "
        "cross-entropy with the labels + A * T^2 * KL(teacher || student) at temperature T",
    )
    g.add_argument(
        "--distill-temperature",
        type=float,
        default=4.0,
        metavar="T",
        help="softmax temperature of teacher "
        "and student in the distillation term: above 1, the teacher's small probabilities count too",
    )
    runs.add_run_flags(p, out="runs/emotion", task="emotion probabilities")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = runs.parse_flags(p, argv)
    training.check_optimizer_flags(p, args)
    if args.tta == "tencrop" and not args.crop:
        p.error("--tta tencrop needs --crop (e.g. --crop 40): the model must be trained on crops")
    if args.crop and not 8 <= args.crop <= 48:
        p.error("--crop must be between 8 and 48 pixels")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.val_fraction and args.split != "official":
        p.error(f"--val-fraction is for --split official: --split {args.split} has its own validation part")
    if args.crop_faces and args.data == "synthetic":
        p.error("--crop-faces needs --data to be a folder of photos per class, not synthetic faces")
    if args.mixup_lam is not None and not 0 < args.mixup_lam <= 1:
        p.error("--mixup-lam must be in (0, 1]")
    if args.sam < 0:
        p.error("--sam must be a radius >= 0 (e.g. 0.05), or 0 for off")
    if not (0 <= args.erasing <= 1 and 0 <= args.zoom < 1 and 0 <= args.translate < 1):
        p.error("--zoom must be in [0, 1), --translate too, --erasing (a probability) in [0, 1]")
    if args.rotate < 0 or args.shear < 0 or args.cutout < 0:
        p.error("--rotate, --shear and --cutout give a range +-value: 0 or more")
    if args.cutmix < 0 or args.mixup < 0:
        p.error("--cutmix and --mixup take a Beta parameter a > 0, or 0 for off")
    if args.cutmix and (args.mixup or args.mixup_lam) and not args.no_augment:
        p.error("--cutmix replaces mixup: add --mixup 0")
    if args.ensemble < 1:
        p.error("--ensemble N takes a number of networks, 1 or more")
    if args.ensemble > 1 and args.model not in models.STACKABLE:
        p.error(
            f"--ensemble supports {' and '.join(models.STACKABLE)}, whose layers stack into grouped ones: "
            f"not {args.model}"
        )
    if args.ensemble > 1 and (args.sam or args.distill):
        p.error(
            "--ensemble trains without --sam (its step size depends on all members' gradients at once) and without "
            "--distill (distil the ensemble into one network instead)"
        )
    if not args.distill and {"distill_weight", "distill_temperature"} & args.given.keys():
        p.error("--distill-weight and --distill-temperature need --distill CKPT")
    if not 0 <= args.distill_weight <= 1 or args.distill_temperature <= 0:
        p.error("--distill-weight must be in [0, 1], --distill-temperature above 0")
    if args.synthetic_count < 70:
        p.error("--synthetic-count must be at least 70")
    try:
        args.model_options = models.check_options(args.model, runs.model_options(args, pretrained=args.pretrained))
    except ValueError as e:
        p.error(str(e))
    if args.no_augment:
        args.rotate = args.shear = args.zoom = args.translate = args.erasing = args.mixup = args.cutmix = 0.0
        args.flip, args.cutout, args.mixup_lam = False, 0, None
    return args


# ----------------------------------------------------------------------------- data on the device


def load_faces(cfg: dict) -> data.FaceImages:
    if cfg["data"] == "synthetic":
        return data.synthetic_faces(cfg["synthetic_count"], seed=cfg["seed"])
    if cfg["crop_faces"]:
        return data.face_folders(cfg["data"], size=48, classes=data.EMOTIONS, cache_dir=cfg["cache"])
    return data.load_fer2013(cfg["data"], cache_dir=cfg["cache"])


def model_input(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 images as stored -> the float tensor the model sees (train and test alike)."""
    x = images.float().div_(255)
    if cfg["brightness"] or cfg["contrast"] != 1:
        x = augment.brightness_contrast(x, cfg["brightness"], cfg["contrast"])
    if cfg["sobel_channels"]:
        x = augment.sobel_contrast_channels(x)
    return x


def augment_batch(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    if cfg["rotate"] or cfg["shear"] or cfg["zoom"] or cfg["translate"]:
        x = augment.random_affine(x, cfg["rotate"], cfg["shear"], cfg["zoom"], cfg["translate"], generator=gen)
    if cfg["flip"]:
        x = augment.random_hflip(x, generator=gen)
    if cfg["crop"]:
        x = augment.random_crop(x, cfg["crop"], generator=gen)
    if cfg["cutout"]:
        x = augment.cutout(x, cfg["cutout"], generator=gen)
    if cfg["erasing"]:
        x = augment.random_erasing(x, cfg["erasing"], generator=gen)
    return x


def member_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits [B, members, classes] for images [B, C, H, W]; every member of an ensemble sees them all."""
    if isinstance(model, models.StackedNetworks):
        return model(x.repeat(1, model.members, 1, 1).contiguous(memory_format=torch.channels_last))
    return model(x)[:, None]


@torch.no_grad()
def predict_proba(model, images: torch.Tensor, cfg: dict, batch_size=1024, each_member=False) -> torch.Tensor:
    """Softmax probabilities [N, classes] for uint8 images, with the run's test-time augmentation; an ensemble's are
    the mean of its members' (each_member: [N, members, classes], each member's own)."""
    model.eval()
    out = []
    batch_size //= getattr(model, "members", 1)  # an ensemble's members each see the batch: the same memory per batch
    for i in range(0, len(images), batch_size):
        x = model_input(images[i : i + batch_size], cfg)
        if cfg["tta"] == "tencrop":
            views = augment.ten_crop_flip(x, cfg["crop"])
        else:
            x = augment.center_crop(x, cfg["crop"]) if cfg["crop"] else x
            views = torch.stack([x, x.flip(-1)]) if cfg["tta"] == "flip" else x[None]
        with training.autocast(x.device, cfg["precision"]):
            logits = member_logits(model, views.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(-1).unflatten(0, views.shape[:2]).mean(0))
    proba = torch.cat(out)
    return proba if each_member else proba.mean(1)


def scores(proba, labels) -> tuple[float, float]:
    """Plain cross-entropy (no smoothing, so losses compare across runs) and accuracy of probabilities."""
    return F.nll_loss(proba.clamp_min(1e-12).log(), labels).item(), (proba.argmax(1) == labels).float().mean().item()


def evaluate(model, images, labels, cfg) -> tuple[float, float, torch.Tensor]:
    """scores and the probabilities (an ensemble's: the mean of its members')."""
    proba = predict_proba(model, images, cfg)
    return *scores(proba, labels), proba


def accuracy_by_usage(hits, usage) -> dict:
    """{FER2013 Usage: accuracy} from whether each test image was right (hits [images], or [images, members]:
    their mean)."""
    return {data.USAGES[u]: round(hits[usage == u].float().mean().item(), 5) for u in usage.unique().tolist()}


# ----------------------------------------------------------------------------- training


def make_model(cfg, in_channels, num_classes, image_size, device):
    members = cfg.get("ensemble", 1)  # checkpoints from before --ensemble hold one network
    try:  # an ensemble's members one after the other: each draws its own initial weights from the seeded generator
        nets = [
            models.build_model(cfg["model"], in_channels, num_classes, image_size, **cfg["model_options"])
            for _ in range(members)
        ]
    except (TypeError, ValueError, models.WeightsUnavailableError) as e:
        too_small = cfg["crop"] and isinstance(e, models.ImageTooSmallError)
        hint = (
            f"; it sees {image_size}x{image_size} crops (--crop {cfg['crop']}): --crop 0 gives it whole images"
            if too_small
            else ""
        )
        raise runs.RunError(f"model {cfg['model']}: {e}{hint}") from None
    model = nets[0] if members == 1 else models.stack_networks(nets)
    # channels_last: faster convolutions on GPU tensor cores, and 0-40% faster on CPU (oneDNN) for these nets
    return model.to(device, memory_format=torch.channels_last)


def load_trained(checkpoint, device):
    """(network in eval mode, config, classes) of a train_emotion.py checkpoint: its averaged weights when it kept
    them."""
    ckpt = runs.load_checkpoint(checkpoint, map_location=device, needs=PREDICT_KEYS)
    where = Path(checkpoint)
    cfg, classes = ckpt["config"], ckpt["classes"]
    missing = [
        k for k in ("model", "model_options", "crop", "tta", "sobel_channels", "brightness", "contrast") if k not in cfg
    ]
    if missing or not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise runs.RunError(
            f"{where} was not saved by train_emotion.py (its config or classes are not this script's): "
            "use a checkpoint from runs/emotion/"
        )
    in_channels = 3 if cfg["sobel_channels"] else 1
    model = make_model(cfg, in_channels, len(classes), cfg["crop"] or 48, device)
    with runs.loading(where, "weights"):
        model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model.eval(), cfg, classes


def load_teacher(cfg, classes, device):
    """--distill's network; it must have been trained on these classes and on images prepared as this run's."""
    teacher, taught, its_classes = load_trained(cfg["distill"], device)
    if its_classes != classes:
        raise runs.RunError(
            f"--distill {cfg['distill']} was trained on other classes ({', '.join(its_classes)}): "
            "use a checkpoint of a run on the same data"
        )
    for key in ("crop", "sobel_channels", "brightness", "contrast"):
        if taught[key] != cfg[key]:
            raise runs.RunError(
                f"--distill {cfg['distill']} was trained with --{key.replace('_', '-')} {taught[key]}, this run "
                f"has {cfg[key]}: the teacher must see the images as the student does"
            )
    return teacher


@torch.no_grad()
def soft_targets(teacher, x, temperature, precision):
    """The teacher's probabilities at this temperature (an ensemble's: the mean of its members')."""
    with training.autocast(x.device, precision):
        logits = member_logits(teacher, x)
    return (logits.float() / temperature).softmax(-1).mean(1)


def mix(x, y, cfg, gen):
    """Mixup or cutmix when on: (x, y, y_b, lam) as augment.mixup returns them; y_b and lam None when both are off."""
    if cfg["mixup"] or cfg["mixup_lam"]:
        return augment.mixup(x, y, cfg["mixup"], cfg["mixup_lam"], generator=gen)  # lam: one per batch
    if cfg["cutmix"]:
        return augment.cutmix(x, y, cfg["cutmix"], generator=gen)  # lam: one per image
    return x, y, None, None


def mix_members(x, y, cfg, gen):
    """mix for an ensemble's batch x [N, B, C, H, W], y [N, B]: each member within its own batch, with its own lambda
    (lam [N, B]). x comes back as the stacked network takes it, [B, N*C, H, W], member i's images in channels
    i*C:(i+1)*C."""
    xs, ys, y_bs, lams = zip(*[mix(x_i, y_i, cfg, gen) for x_i, y_i in zip(x, y)])
    x, y = torch.stack(xs, 1).flatten(1, 2), torch.stack(ys)
    if y_bs[0] is None:
        return x, y, None, None
    return (
        x,
        y,
        torch.stack(y_bs),
        torch.stack([torch.as_tensor(lam, device=x.device).expand(y.shape[1]) for lam in lams]),
    )


def train_step(step_model, optimizer, x, y, cfg, gen, teacher=None):
    """Mixup or cutmix (when on), forward, loss, backward and optimizer step on an augmented batch.

    Returns the loss (still on the device: reading it would make the CPU wait for the GPU), the logits and the
    labels they are scored against (with mixup or cutmix, those of the first image of each blend).
    An ensemble's batch is x [N, B, C, H, W] and y [N, B], member i's at i; it returns the members' mean loss and
    logits [N, B, classes]. teacher (--distill) adds its softened outputs on the same mixed images as targets.
    """
    members = len(x) if x.ndim == 5 else 1
    x, y, y_b, lam = mix(x, y, cfg, gen) if members == 1 else mix_members(x, y, cfg, gen)
    x = x.contiguous(memory_format=torch.channels_last)
    soft = None if teacher is None else soft_targets(teacher, x, cfg["distill_temperature"], cfg["precision"])

    def forward_backward():
        with training.autocast(x.device, cfg["precision"]):
            logits = step_model(x)
            if members > 1:
                logits = logits.transpose(0, 1)  # [N, B, classes], as y
            flat = logits.flatten(0, -2)  # all members' images as one batch
            if y_b is None:
                loss = F.cross_entropy(flat, y.flatten(), label_smoothing=cfg["label_smoothing"])
            else:

                def per_image(target):
                    return F.cross_entropy(
                        flat, target.flatten(), label_smoothing=cfg["label_smoothing"], reduction="none"
                    ).view(target.shape)

                loss = (lam * per_image(y) + (1 - lam) * per_image(y_b)).mean()
            if soft is not None:  # Hinton et al. 2015; T^2 keeps the soft term's gradients the same size whatever T
                T, a = cfg["distill_temperature"], cfg["distill_weight"]
                loss = (1 - a) * loss + a * T**2 * F.kl_div(
                    F.log_softmax(logits.float() / T, -1), soft, reduction="batchmean"
                )
        optimizer.zero_grad(set_to_none=True)
        # The SUM of the members' mean losses (the mean over all images is 1/N of it): each member then gets the
        # gradient it would get alone, and the elementwise optimizer does to each what it would do alone.
        (loss * members).backward()
        return loss.detach(), logits

    loss, logits = forward_backward()
    if cfg["sam"]:
        logits = logits.clone()  # with --compile on a GPU the second forward may reuse the memory of the first's output
        # Sharpness-aware minimisation (Foret et al. 2021): step with the gradient taken at the weights moved a
        # distance rho uphill, which favours flat minima. Twice the compute; BatchNorm statistics see both passes.
        params = [p for p in step_model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        uphill = torch._foreach_mul(grads, cfg["sam"] / (grad_norm + 1e-12))  # on the device: no host sync
        with torch.no_grad():
            torch._foreach_add_(params, uphill)
        forward_backward()
        with torch.no_grad():
            torch._foreach_sub_(params, uphill)
    optimizer.step()
    return loss, logits, y


NOT_SAVED = runs.NOT_SETTINGS + ("pretrained",)  # folded into model_options
PREDICT_KEYS = ("model", "config", "classes")  # what --predict needs of a checkpoint; to go on training, also:
RESUME_KEYS = runs.TRAINING_STATE + ("classes", "best_acc")


def load_split(cfg: dict) -> tuple[data.FaceImages, dict]:
    """The images and the split's indices (train, val, test), said in one line."""
    t0 = time.perf_counter()
    faces = load_faces(cfg)
    split = data.split_indices(faces, cfg["split"], cfg["val_fraction"], cfg["seed"])
    print(
        f"data: {len(faces)} images from {cfg['data']} in {time.perf_counter() - t0:.1f}s; split {cfg['split']}: "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items())
    )
    if len(split["test"]) == 0:  # e.g. photo folders, which are all Training
        raise data.DataError(
            f"split {cfg['split']} leaves no test images in {cfg['data']}: "
            "use a protocol that pools all images, --split utec or --split udine"
        )
    return faces, split


def train(args, command: str):
    device = training.pick_device(args.device)
    training.keep_freed_memory()
    run = runs.Run(args, command, device, RESUME_KEYS, NOT_SAVED, best="best_acc")
    cfg, members, device = run.cfg, run.cfg["ensemble"], run.device  # under torchrun: this process's GPU
    training.suggest_precision(device, cfg["precision"])
    faces, split = load_split(cfg)
    # The whole set lives on the training device as uint8 (FER2013: 83 MB); batches are gathered by index there.
    x_train, y_train = faces.images[split["train"]].to(device), faces.labels[split["train"]].to(device)
    x_val, y_val = faces.images[split["val"]].to(device), faces.labels[split["val"]].to(device)
    classes = list(faces.classes)
    in_channels, size = 3 if cfg["sobel_channels"] else faces.images.shape[1], cfg["crop"] or faces.images.shape[-1]
    training.check_memory(
        device,
        run.cfg["batch_size"],
        (lambda: make_model(cfg, in_channels, len(classes), size, "meta"), [(in_channels * members, size, size)]),
    )
    model = make_model(cfg, in_channels, len(classes), size, device)
    teacher = load_teacher(cfg, classes, device) if cfg["distill"] else None
    batch_size, steps = run.batching(len(x_train))
    optimizer = training.make_optimizer(model, cfg)
    scheduler = training.make_scheduler(optimizer, cfg, steps)
    # The averaged copy is what gets validated, tested and used by --predict; the live model is what trains.
    average = training.WeightAverage(model, cfg["ema"]) if cfg["ema"] else None
    ema = None if average is None else average.module
    evaluated = model if ema is None else ema
    run.start(
        f"{cfg['model']}-{datetime.now():%Y%m%d-%H%M%S}",
        {"model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler},
        data=x_train,
        check={"classes": classes},
        plot=lambda: metrics.plot_curves(run.history, run.folder / "curves.png"),
    )
    print(
        f"model: {cfg['model']}"
        + (f" {cfg['model_options']}" if cfg["model_options"] else "")
        + (f" x {members}, stacked" if members > 1 else "")
        + f", {models.count_parameters(model):,} parameters, "
        f"on {device}" + (f"; teacher {cfg['distill']}" if teacher else "")
    )
    step_model = run.parallel(model, cfg["sync_bn"])  # under torchrun: DistributedDataParallel
    step_model, gen = training.compiled(step_model, device) if cfg["compile"] else step_model, run.augment_generator

    for epoch in run.epochs():
        model.train()
        sums = run.epoch_sums(loss=(), correct=())  # summed on the device: no host sync per step
        for step, idx in run.batches(members, show=("loss", "correct")):  # idx [B], or [B, N]: one batch per member
            x = augment_batch(model_input(x_train[idx.t().flatten()], cfg), cfg, gen)  # all members' in one call
            if members > 1:
                x = x.unflatten(0, (members, -1))  # [N, B, C, H, W]
            loss, logits, y = train_step(step_model, optimizer, x, y_train[idx.t()], cfg, gen, teacher)
            if average is not None:
                average.update(done=epoch * steps + step + 1)
            if cfg["scheduler"] in ("onecycle", "cosine"):
                scheduler.step()
            sums["loss"] += loss * len(idx)
            sums["correct"] += (logits.argmax(-1) == y).sum() / members  # an ensemble's: its members' mean
        seen = steps * batch_size
        train_loss, train_acc = (torch.stack([sums["loss"], sums["correct"]]) / seen).tolist()  # one wait for the GPU

        # under torchrun: by process 0, for all
        val_loss, val_acc = run.on_main(lambda: validate(evaluated, x_val, y_val, cfg)) if len(x_val) else (None, None)
        if cfg["scheduler"] == "plateau":
            scheduler.step(val_loss if val_loss is not None else train_loss)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "train_acc": round(train_acc, 5),
            "val_loss": None if val_loss is None else round(val_loss, 5),
            "val_acc": None if val_acc is None else round(val_acc, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(run.seconds, 2),
        }
        print(
            f"epoch {epoch + 1:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}"
            + (f"  val loss {val_loss:.4f} acc {val_acc:.4f}" if val_acc is not None else "")
            + f"  {run.seconds:.1f}s  {seen / run.seconds:.0f} img/s"
        )
        stopping = bool(cfg["stop_loss"]) and train_loss <= cfg["stop_loss"]
        run.end_epoch(row, score=val_acc, last=stopping)
        if stopping:
            print(f"training loss {train_loss:.4f} <= --stop-loss {cfg['stop_loss']}: stopping")

    if not run.is_main:  # under torchrun process 0 alone tests and writes the results
        return 0
    # Test once, with the weights chosen on validation (or the last ones).
    best = run.best_weights(model=model, ema=ema)
    test_idx = split["test"][:256] if cfg["dry_run"] else split["test"]
    result, cm = test(evaluated, model, teacher, faces, test_idx, cfg, device)
    result = run.finish(
        {
            **result,
            "best_epoch": best["epoch"],
            "best_val_accuracy": run.best if run.best >= 0 else None,
            "parameters": models.count_parameters(model),
            **metrics.summarize(cm, classes),
            "split_sizes": {k: len(v) for k, v in split.items()},
        }
    )
    metrics.plot_confusion(cm, classes, run.folder / "confusion.png")
    print(metrics.format_table(metrics.per_class_table(cm, classes)))
    by_usage = ", ".join(f"{k} {v:.4f}" for k, v in result["test_accuracy_by_usage"].items())
    print(
        f"test accuracy {result['test_accuracy']:.4f} ({by_usage}) with the weights of epoch {best['epoch']}; "
        f"training took {run.train_seconds:.0f}s on {result['device']}; results in {run.folder}"
    )
    return 0


def validate(evaluated, x_val: torch.Tensor, y_val: torch.Tensor, cfg: dict) -> tuple[float, float]:
    """Loss and accuracy on the validation images (256 of them in a --dry-run), and a warning if the network is dead."""
    n = 256 if cfg["dry_run"] else len(x_val)
    val_loss, val_acc, val_proba = evaluate(evaluated, x_val[:n], y_val[:n], cfg)
    warn_if_dead(val_proba)
    return val_loss, val_acc


def warn_if_dead(val_proba: torch.Tensor):
    # The same output for every image (or NaN, which fails the comparison too) means the network no longer sees its
    # input: its loss diverged, or a whole layer of ReLUs died, and dead ReLUs pass no gradient, so it will not
    # recover. Said at once, this spares the hours left of a doomed CPU run.
    if len(val_proba) > 1 and not (val_proba.amax(0) - val_proba.amin(0)).amax() > 1e-6:
        warnings.warn(
            "the model gives the same output for every validation image: it has stopped learning (its "
            "loss diverged or its ReLUs died); start again with a lower --lr or another --seed"
        )


def test(evaluated, model, teacher, faces, test_idx, cfg, device) -> tuple[dict, torch.Tensor]:
    """The test part's scores and confusion matrix; beside them, measured on the same weights, what the test-time
    augmentation and the weight average each add, an ensemble's members alone (to see what averaging them adds),
    and the teacher (to see how much of it the student keeps)."""
    x_test, y_test = faces.images[test_idx].to(device), faces.labels[test_idx].to(device)
    each = predict_proba(evaluated, x_test, cfg, each_member=True)  # [images, members, classes]
    proba = each.mean(1)
    test_loss, test_acc = scores(proba, y_test)
    pred, usage = proba.argmax(1).cpu(), faces.usage[test_idx]
    result = {
        "test_accuracy": round(test_acc, 5),
        "test_loss": round(test_loss, 5),
        "test_accuracy_by_usage": accuracy_by_usage(pred == y_test.cpu(), usage),
    }
    if each.shape[1] > 1:
        hits = (each.argmax(-1) == y_test[:, None]).cpu()  # [images, members]
        result["member_test_accuracies"] = [round(a, 5) for a in hits.float().mean(0).tolist()]
        result["mean_member_test_accuracy"] = round(hits.float().mean().item(), 5)
        result["mean_member_test_accuracy_by_usage"] = accuracy_by_usage(hits, usage)
    if teacher is not None:
        result["teacher"] = cfg["distill"]
        result["teacher_test_accuracy"] = round(evaluate(teacher, x_test, y_test, cfg)[1], 5)
    if cfg["tta"] != "none":
        result["test_accuracy_without_tta"] = round(evaluate(evaluated, x_test, y_test, {**cfg, "tta": "none"})[1], 5)
    if evaluated is not model:
        result["test_accuracy_without_ema"] = round(evaluate(model, x_test, y_test, cfg)[1], 5)
    return result, metrics.confusion_matrix(pred, y_test.cpu(), len(faces.classes))


# ----------------------------------------------------------------------------- inference on photos


def predict(args):
    device = training.pick_device(args.device)
    model, cfg, classes = load_trained(args.checkpoint, device)  # an ensemble: the mean of its members' softmaxes
    cfg = {**cfg, "precision": args.precision}  # this command's, also for checkpoints saved before the flag existed

    def describe(crops):
        proba = predict_proba(model, crops.to(device), cfg).cpu()
        ranked = proba.argsort(1, descending=True)
        return [
            (", ".join(f"{classes[k]} {p[k]:.2f}" for k in order), f"{classes[order[0]]} {p[order[0]]:.0%}")
            for p, order in zip(proba, ranked)
        ]

    data.predict_photos(
        args.predict, runs.predictions_folder(args), "emotions", describe, size=48, grayscale=True, device=str(device)
    )
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return runs.one_line_errors(
        lambda: predict(args) if args.predict else train(args, shlex.join(["train_emotion.py", *argv])), data.DataError
    )


if __name__ == "__main__":
    sys.exit(main())
