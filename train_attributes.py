"""Train face-attribute networks: gender, age group and age in years on UTKFace (UTEC report), CelebA's attributes
(Concepción report), or built-in synthetic faces; or run a trained model on photos.

    python train_attributes.py --data synthetic --epochs 3      # a complete run folder in a minute, no download
    make utkface DATA=data/UTKFace      # facenets' multi-head net: gender 87.9%, age group 81.3%, age within 4.3
                                        # years on average, 15 min on 2 CPU cores with AMX in bf16 (9,780 crops, 80/20)
    make utec DATA=data/UTKFace         # the UTEC report's Arch 2 on the same split: 83.1% / 69.2% in 11 min
    make concepcion DATA=data/celeba    # the Concepción classifier, a model per attribute (Male, Eyeglasses, Smiling):
                                        # ~45 min per attribute on 2 CPU cores (measured on a generated fixture)
    make attributes DATA=data/celeba    # facenets' net on all forty CelebA attributes at once
    python train_attributes.py --predict photo.jpg --checkpoint runs/attributes/<run>/best.pt

REPRODUCING.md gives what each reaches and how long it takes. Every run writes runs/attributes/<name>/: config.json,
log.csv, curves.png, last.pt, best.pt, and at the end metrics.json (per head: accuracy, precision, recall, F1 and the
confusion matrix; age in years: the mean absolute error, its spread and its mean by age group; many attributes: their
mean accuracy), a confusion picture per head, age-errors.png and attributes.png. last.pt is rewritten every 30 s:
--resume RUN_DIR continues a stopped or killed run exactly. Images are decoded once at the model's size into a cached
uint8 tensor that sits on the training device and is augmented there in batches.
"""

import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the imports below load (seconds): one line and status 130
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\nstopped while starting: nothing was written") or 130))
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))

import math
import shlex
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from facenets import augment, data, metrics, models, runs, training

AGE_BINS = 101  # the age head is a distribution over 0..100 years (UTKFace's few older faces count as 100)
# Each preset is the flags a report used; flags given on the command line still win.
PRESETS = {
    "concepcion": dict(
        model="concepcion_classifier",
        split="concepcion",
        image_size=[218, 178],
        celeba_crop="none",
        optimizer="rmsprop",
        lr=1e-3,
        batch_size=50,
        epochs=15,
        scheduler="none",
        weight_decay=0.0,
        label_smoothing=0.0,
        ema=0.0,
        flip=False,
        translate=0.0,
        erasing=0.0,
        mixup=0.0,
        tta="none",
    ),
    "utec": dict(
        model="utec_arch2",
        targets=["gender", "age_group"],
        optimizer="adam",
        lr=1e-3,
        batch_size=64,
        epochs=30,
        scheduler="none",
        weight_decay=0.0,
        label_smoothing=0.0,
        ema=0.0,
        flip=False,
        translate=0.0,
        erasing=0.0,
        mixup=0.0,
        tta="none",
    ),
}
UTKFACE_TARGETS = ("gender", "age_group", "age", "joint")  # joint: gender x age group as one classifier (UTEC report)
PHOTO_MARGIN = {"utkface": 0.25, "celeba": 0.5}  # room around MTCNN's box, to look like the training crops

# ----------------------------------------------------------------------------- flags


def build_parser():
    p = runs.FlagParser(__doc__, epilog="models: " + ", ".join(models.MODELS))
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="data/UTKFace",
        help="a UTKFace folder (<age>_<gender>_<race>_<date>.jpg), a CelebA folder "
        "(list_attr_celeba.txt or .csv, list_eval_partition, img_align_celeba/ or its .zip), or 'synthetic'",
    )
    g.add_argument(
        "--task",
        default="auto",
        choices=("auto", "utkface", "celeba"),
        help="auto: celeba when --data "
        "holds CelebA's lists, utkface when it holds UTKFace-named images, else what the flags name "
        "(--attrs, --split official or concepcion: celeba)",
    )
    g.add_argument(
        "--targets",
        nargs="+",
        default=["gender", "age_group", "age"],
        choices=UTKFACE_TARGETS,
        help="utkface: the heads to train; joint is the report's single gender x age-group classifier",
    )
    g.add_argument(
        "--age-groups",
        nargs="+",
        type=int,
        default=list(data.AGE_GROUPS),
        metavar="AGE",
        help="utkface: the upper ages of each group but the last (the default: 0-12, 13-19, 20-39, 40-59, 60+)",
    )
    g.add_argument(
        "--attrs",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help="celeba: attributes by CelebA's names (e.g. Male Eyeglasses Smiling), or all forty",
    )
    g.add_argument(
        "--split",
        default="auto",
        choices=("auto", "stratified", "utec", "official", "concepcion"),
        help="utkface: stratified (seeded 80/20, stratified on gender x age group; the default) or utec (the "
        "report's 70/30, a minimum per class); celeba: official (its partitions; the default) or concepcion "
        "(a balanced sample per attribute from them, see --sample-sizes)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="utkface: stratified share of the training part held "
        "out for validation and model selection (0 = none: the last epoch is tested); the test part stays the same",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="utkface: the seed of the stratified and utec splits "
        "and of --val-fraction; apart from --seed, so that runs with different seeds are tested on the same "
        "faces",
    )
    g.add_argument(
        "--sample-sizes",
        nargs=3,
        type=int,
        default=[10_000, 2_000, 1_000],
        metavar=("TRAIN", "VAL", "TEST"),
        help="--split concepcion: images per part, half with the attribute and half without",
    )
    g.add_argument(
        "--image-size",
        nargs="+",
        type=int,
        default=[64],
        metavar="PIXELS",
        help="the model's input: one size for squares, or height width (the Concepción report: 218 178)",
    )
    g.add_argument(
        "--celeba-crop",
        default="square",
        choices=data.CELEBA_CROPS,
        help="celeba: square takes the centre "
        "178x178 face square, none the whole 178x218 image (the Concepción report)",
    )
    g.add_argument(
        "--crop-faces",
        action="store_true",
        help="utkface: --data holds in-the-wild photos: crop the biggest face with MTCNN first",
    )
    g.add_argument("--synthetic-count", type=int, default=3000, help="number of faces for --data synthetic")
    g.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="a report's setup: concepcion (its classifier, RMSprop, batch "
        "50, 15 epochs, 218x178, a balanced sample; one attribute per run) or utec (Arch 2, Adam 1e-3, gender and "
        "age group); flags given explicitly still win",
    )

    g = p.add_argument_group("model")
    runs.add_model_flags(g, models.MODELS, example="dropout=0.3")
    g.add_argument(
        "--age-sigma",
        type=float,
        default=2.0,
        help="the age head learns a normal distribution of this spread "
        "(years) around the true age, plus the error of its mean (DLDL)",
    )

    g = p.add_argument_group("augmentation (training batches only, on the training device)")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    g.add_argument("--translate", type=float, default=0.1, help="random shift, +- fraction of the image size")
    g.add_argument("--rotate", type=float, default=0.0, help="random rotation, +- degrees")
    g.add_argument("--zoom", type=float, default=0.0, help="random zoom, scale in [1-z, 1+z]")
    g.add_argument("--erasing", type=float, default=0.0, help="probability of random erasing per image")
    g.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="mixup with lambda ~ Beta(a, a) per batch: every head learns the "
        "same blend of the two images' labels; 0 = off",
    )
    g.add_argument(
        "--tta", default="flip", choices=("none", "flip"), help="test-time augmentation: average with the mirror image"
    )

    training.add_optimizer_flags(p, epochs=30, batch_size=64, lr=0.1, label_smoothing=0.0, ema=0.0)
    runs.add_run_flags(p, out="runs/attributes", task="labels")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = runs.parse_flags(p, argv, PRESETS)  # a preset's flags as defaults: flags given explicitly still win
    training.check_optimizer_flags(p, args)
    if len(args.image_size) > 2 or min(args.image_size) < 8:
        p.error("--image-size takes one size (a square) or height and width, each at least 8 pixels")
    if sorted(set(args.age_groups)) != args.age_groups or args.age_groups[0] < 1:
        p.error("--age-groups must be increasing ages of at least 1, e.g. 12 19 39 59")
    if "joint" in args.targets and len(args.targets) > 1:
        p.error("--targets joint is the report's single gender x age-group classifier: give it alone")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if min(args.sample_sizes) < 2 or args.synthetic_count < 100 or args.age_sigma <= 0:
        p.error("--sample-sizes must be at least 2 each, --synthetic-count at least 100, --age-sigma positive")
    if not (
        0 <= args.translate < 1
        and 0 <= args.zoom < 1
        and 0 <= args.erasing <= 1
        and args.rotate >= 0
        and args.mixup >= 0
    ):
        p.error(
            "--translate and --zoom must be in [0, 1), --erasing (a probability) in [0, 1], "
            "--rotate and --mixup 0 or more"
        )
    if args.preset == "concepcion" and len(args.attrs) != 1 or args.split == "concepcion" and args.attrs == ["all"]:
        p.error(
            "the Concepción protocol trains one model per attribute: give one --attrs (make concepcion runs all three)"
        )
    try:
        args.model_options = models.check_options(args.model, runs.model_options(args))
    except ValueError as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------------------------- data and heads


def infer_task(cfg: dict) -> str:
    """--task, or the data set --data holds: celeba where CelebA's lists are, utkface where images are named as
    UTKFace's, else the one the flags name (--attrs or --split official or concepcion: celeba); else a DataError
    naming what was looked for (a folder of CelebA images without the lists, as `make attributes` may be given)."""
    if cfg["task"] != "auto":
        return cfg["task"]
    root = Path(cfg["data"]).expanduser()
    if root.is_dir() and any(root.glob("list_attr_celeba.*")):
        return "celeba"
    if data.holds_utkface_images(root):
        return "utkface"
    if cfg["attrs"] != ["all"] or cfg["split"] in ("official", "concepcion"):
        return "celeba"  # read_celeba_labels then says which of its lists is missing, and where it looked
    where = f"{root.absolute()}" + ("" if root.exists() else " (no such folder)")
    raise data.DataError(
        f"neither CelebA's lists (list_attr_celeba.txt, list_eval_partition.txt) nor UTKFace images "
        f"(<age>_<gender>_<race>_<datetime>.jpg) were found in {where}: for CelebA's attributes, "
        f"{data.GET_CELEBA}; for UTKFace, {data.GET_UTKFACE}"
    )


def load_faces(cfg: dict) -> tuple[data.AttributeFaces, dict]:
    """The decoded faces at the model's size and the split, {"train", "val", "test"} indices into them, said in one
    line."""
    t0 = time.perf_counter()
    size = tuple(cfg["image_size"]) if len(cfg["image_size"]) == 2 else cfg["image_size"][0]
    if cfg["data"] == "synthetic":
        faces = data.synthetic_attribute_faces(
            cfg["synthetic_count"], cfg["task"], size if isinstance(size, int) else size[0], seed=cfg["seed"]
        )
    elif cfg["task"] == "celeba":
        names, attributes, columns, partition = data.read_celeba_labels(cfg["data"], need_partition=True)
        if cfg["split"] == "concepcion":
            column = data.select_attributes(columns, cfg["attrs"])[0]
            sample = data.concepcion_sample(attributes, partition, column, cfg["sample_sizes"], cfg["seed"])
            index = torch.cat([sample["train"], sample["val"], sample["test"]])
        else:
            index = (partition >= 0).nonzero().flatten()
        faces = data.load_celeba(cfg["data"], index, size, cfg["celeba_crop"], cfg["cache"])
    else:
        if not isinstance(size, int):
            raise data.DataError("UTKFace faces are square: give --image-size one size, e.g. 64")
        faces = data.load_utkface(cfg["data"], size, cfg["cache"], cfg["crop_faces"])
    if cfg["task"] == "celeba":  # the official partitions (which the Concepción sample was drawn from too)
        split = {part: (faces.partition == i).nonzero().flatten() for i, part in enumerate(("train", "val", "test"))}
    else:
        split_seed = cfg.get("split_seed", cfg["seed"])  # runs saved before --split-seed split with their --seed
        split = data.utkface_split(
            faces.targets, cfg["split"], split_seed, cfg["age_groups"], cfg.get("val_fraction", 0.0)
        )
    print(
        f"data: {len(faces)} {cfg['task']} faces from {cfg['data']} at {'x'.join(map(str, faces.images.shape[-2:]))} "
        f"in {time.perf_counter() - t0:.1f}s; split {cfg['split']}: "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items())
    )
    if not len(split["train"]) or not len(split["test"]):
        raise data.DataError(
            f"the {cfg['split']} split of {cfg['data']} leaves no training or no test images: use more images"
        )
    return faces, split


def make_heads(cfg: dict, faces: data.AttributeFaces) -> list[dict]:
    """What the network predicts, in the order of its outputs: per head its name, kind and class names.

    kind "class": a softmax over the classes; "binary": one logit, sigmoid (many CelebA attributes at once);
    "age": a softmax over 0..100 years, read as its mean.
    """
    if cfg["task"] == "celeba":
        chosen = data.select_attributes(faces.columns, cfg["attrs"])
        # the Concepción classifier ends in a 2-way softmax per attribute; facenets' nets in one sigmoid each
        kind = "class" if cfg["model"] == "concepcion_classifier" else "binary"
        return [{"name": faces.columns[c], "kind": kind, "column": c, "classes": ["no", "yes"]} for c in chosen]
    groups = list(data.age_group_names(cfg["age_groups"]))
    heads = {
        "gender": {"kind": "class", "classes": list(data.UTKFACE_GENDERS)},
        "age_group": {"kind": "class", "classes": groups},
        "age": {"kind": "age", "classes": []},
        "joint": {"kind": "class", "classes": [f"{g} {a}" for g in data.UTKFACE_GENDERS for a in groups]},
    }
    return [{"name": name, **heads[name]} for name in cfg["targets"]]


def head_targets(heads: list[dict], faces: data.AttributeFaces, cfg: dict) -> torch.Tensor:
    """int64 [N, heads]: the label of every image for every head."""
    if cfg["task"] == "celeba":
        return faces.targets[:, [h["column"] for h in heads]]
    gender, age = faces.targets[:, faces.columns.index("gender")], faces.targets[:, faces.columns.index("age")]
    group = data.age_group(age, cfg["age_groups"])
    columns = {
        "gender": gender,
        "age_group": group,
        "age": age.clamp(max=AGE_BINS - 1),
        "joint": gender * (len(cfg["age_groups"]) + 1) + group,
    }
    return torch.stack([columns[h["name"]] for h in heads], 1)


def outputs(head: dict) -> int:
    """How many of the network's outputs the head reads."""
    return {"class": len(head["classes"]), "binary": 1, "age": AGE_BINS}[head["kind"]]


def head_loss(head: dict, logits: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    if head["kind"] == "class":
        return F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
    if head["kind"] == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    # DLDL-v2 (Gao et al. 2018): match a normal distribution around the true age, and (weight 0.05) its mean to the age
    ages = torch.arange(AGE_BINS, device=y.device, dtype=logits.dtype)
    target = torch.softmax(-0.5 * ((ages - y[:, None]) / cfg["age_sigma"]) ** 2, 1)
    log_p = logits.float().log_softmax(1)
    return -(target * log_p).sum(1).mean() + 0.05 * (log_p.exp() @ ages.float() - y).abs().mean()


def heads_loss(heads: list[dict], logits: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The sum of the heads' losses; logits [B, outputs] hold the heads' outputs side by side, y [B, heads]."""
    start, total = 0, 0.0
    for h, head in enumerate(heads):
        total = total + head_loss(head, logits[:, start : start + outputs(head)].float(), y[:, h], cfg)
        start += outputs(head)
    return total


def model_input(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def augment_batch(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    if cfg["rotate"] or cfg["zoom"] or cfg["translate"]:
        x = augment.random_affine(x, cfg["rotate"], 0.0, cfg["zoom"], cfg["translate"], generator=gen)
    if cfg["flip"]:
        x = augment.random_hflip(x, generator=gen)
    if cfg["erasing"]:
        x = augment.random_erasing(x, cfg["erasing"], generator=gen)
    return x


@torch.no_grad()
def predict(model, images: torch.Tensor, heads: list[dict], cfg: dict, batch_size=512) -> list[torch.Tensor]:
    """Per head: class probabilities [N, classes], the probability of "yes" [N], or the expected age [N]."""
    model.eval()
    out = [[] for _ in heads]
    for i in range(0, len(images), batch_size):
        x = model_input(images[i : i + batch_size])
        views = [x, x.flip(-1)] if cfg["tta"] == "flip" else [x]
        with training.autocast(x.device, cfg["precision"]):
            logits = [model(v.contiguous(memory_format=torch.channels_last)).float() for v in views]
        start, probabilities = 0, {}
        for head in heads:
            part = [lg[:, start : start + outputs(head)] for lg in logits]
            start += outputs(head)
            probabilities[head["name"]] = torch.stack(
                [p[:, 0].sigmoid() if head["kind"] == "binary" else p.softmax(1) for p in part]
            ).mean(0)
        if "age" in probabilities and "age_group" in probabilities:
            # the age distribution's share in each group is a second opinion on the group: they are averaged
            edges = [0] + [bound + 1 for bound in cfg["age_groups"]] + [AGE_BINS]
            shares = torch.stack([probabilities["age"][:, a:b].sum(1) for a, b in zip(edges, edges[1:])], 1)
            probabilities["age_group"] = (probabilities["age_group"] + shares) / 2
        ages = torch.arange(AGE_BINS, device=x.device, dtype=torch.float32)
        for h, head in enumerate(heads):
            p = probabilities[head["name"]]
            out[h].append(p @ ages if head["kind"] == "age" else p)
    return [torch.cat(parts) for parts in out]


def decide(head: dict, prediction: torch.Tensor) -> torch.Tensor:
    """The class each image is given: arg-max, "yes" above one half, or the age rounded to years."""
    if head["kind"] == "class":
        return prediction.argmax(1)
    return (prediction > 0.5).long() if head["kind"] == "binary" else prediction.round().long()


def score(heads, predictions, y) -> tuple[float, dict]:
    """The mean accuracy over the classifying heads (the mean absolute age error when there is no other), and each."""
    each = {}
    for h, (head, prediction) in enumerate(zip(heads, predictions)):
        if head["kind"] == "age":
            each[head["name"]] = (prediction - y[:, h].float()).abs().mean().item()
        else:
            each[head["name"]] = (decide(head, prediction) == y[:, h]).float().mean().item()
    accuracies = [v for head, v in zip(heads, each.values()) if head["kind"] != "age"]
    return (sum(accuracies) / len(accuracies) if accuracies else -next(iter(each.values()))), each


def make_model(cfg, count: int, device):
    """The network for cfg with count outputs: every head's side by side."""
    size = tuple(cfg["image_size"]) if len(cfg["image_size"]) == 2 else cfg["image_size"][0]
    try:
        model = models.build_model(cfg["model"], 3, count, size, **cfg["model_options"])
    except (TypeError, ValueError) as e:
        raise runs.RunError(f"model {cfg['model']}: {e}") from None
    return model.to(device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- training

NOT_SAVED = runs.NOT_SETTINGS + ("preset",)  # the preset's flags are saved one by one
PREDICT_KEYS = ("model", "config", "heads")
RESUME_KEYS = runs.TRAINING_STATE + ("heads", "best_score")


def settle_task(cfg: dict) -> None:
    """A new run's task (utkface or celeba, from --data when auto) and its split protocol, checked together."""
    cfg["task"] = "utkface" if cfg["data"] == "synthetic" and cfg["task"] == "auto" else infer_task(cfg)
    if cfg["split"] == "auto":
        cfg["split"] = "official" if cfg["task"] == "celeba" else "stratified"
    if (cfg["task"] == "celeba") != (cfg["split"] in ("official", "concepcion")):
        raise runs.RunError(
            f"--split {cfg['split']} is not a {cfg['task']} protocol: use "
            + ("official or concepcion" if cfg["task"] == "celeba" else "stratified or utec")
        )
    if cfg["task"] == "celeba" and cfg["val_fraction"]:
        raise runs.RunError(
            "--val-fraction is for UTKFace: CelebA's official partitions have their own validation part"
        )
    if cfg["task"] == "utkface" and cfg["attrs"] != ["all"]:
        raise runs.RunError(
            f"--attrs names CelebA attributes, but this run is on UTKFace ({cfg['data']}): pass "
            "a CelebA folder (list_attr_celeba.txt), or choose UTKFace's heads with --targets"
        )


def train(args, command: str):
    device = training.pick_device(args.device)
    training.keep_freed_memory()
    # a run saved before --split-seed split with its --seed
    run = runs.Run(args, command, device, RESUME_KEYS, NOT_SAVED, added={"split_seed": lambda old: old["seed"]})
    cfg, device = run.cfg, run.device  # under torchrun: this process's GPU
    if not run.resuming:
        settle_task(cfg)
    training.suggest_precision(device, cfg["precision"])
    faces, split = load_faces(cfg)
    heads = make_heads(cfg, faces)
    y_all = head_targets(heads, faces, cfg)
    x_train, y_train = faces.images[split["train"]].to(device), y_all[split["train"]].to(device)
    x_val, y_val = faces.images[split["val"]].to(device), y_all[split["val"]].to(device)
    count = sum(outputs(h) for h in heads)
    training.check_memory(device, cfg["batch_size"], (lambda: make_model(cfg, count, "meta"), [x_train.shape[1:]]))
    model = make_model(cfg, count, device)
    batch_size, steps = run.batching(len(x_train))
    optimizer = training.make_optimizer(model, cfg)
    scheduler = training.make_scheduler(optimizer, cfg, steps)
    average = training.WeightAverage(model, cfg["ema"]) if cfg["ema"] else None
    ema = None if average is None else average.module
    evaluated = model if ema is None else ema  # the average is what validates, tests and predicts
    run.start(
        f"{cfg['task']}-{cfg['model']}-{datetime.now():%Y%m%d-%H%M%S}",
        {"model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler},
        data=x_train,
        check={"heads": heads},
        plot=lambda: plot_curves(run.history, run.folder / "curves.png"),
    )
    print(
        f"model: {cfg['model']}"
        + (f" {cfg['model_options']}" if cfg["model_options"] else "")
        + f", {models.count_parameters(model):,} parameters, heads: "
        + ", ".join(h["name"] for h in heads)
        + f", on {device}"
    )
    step_model = run.parallel(model, cfg["sync_bn"])  # under torchrun: DistributedDataParallel
    step_model, gen = training.compiled(step_model, device) if cfg["compile"] else step_model, run.augment_generator

    for epoch in run.epochs():
        model.train()
        sums = run.epoch_sums(loss=())
        for step, idx in run.batches(show=("loss",)):
            x, y, y_other = augment_batch(model_input(x_train[idx]), cfg, gen), y_train[idx], None
            if cfg["mixup"]:
                x, y, y_other, lam = augment.mixup(x, y, cfg["mixup"], generator=gen)
            with training.autocast(device, cfg["precision"]):
                logits = step_model(x.contiguous(memory_format=torch.channels_last))
                loss = heads_loss(heads, logits, y, cfg)
                if y_other is not None:  # every head learns the same blend of the two images' labels
                    loss = lam * loss + (1 - lam) * heads_loss(heads, logits, y_other, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update(done=epoch * steps + step + 1)
            if cfg["scheduler"] in ("onecycle", "cosine"):
                scheduler.step()
            sums["loss"] += loss.detach() * len(idx)
        train_loss = sums["loss"].item() / (steps * batch_size)

        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_score": None}
        if len(x_val):
            n = 256 if cfg["dry_run"] else len(x_val)
            # under torchrun: by process 0, for all
            val_score, each = run.on_main(lambda: score(heads, predict(evaluated, x_val[:n], heads, cfg), y_val[:n]))
            row.update(val_score=round(val_score, 5), **{f"val_{k}": round(v, 5) for k, v in each.items()})
        if cfg["scheduler"] == "plateau":
            scheduler.step(-row["val_score"] if row["val_score"] is not None else train_loss)
        row.update(lr=optimizer.param_groups[0]["lr"], seconds=round(run.seconds, 2))
        print(
            f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}"
            + "".join(f"  {k} {v}" for k, v in row.items() if k.startswith("val_") and v is not None)
            + f"  {run.seconds:.1f}s  {steps * batch_size / run.seconds:.0f} img/s"
        )
        run.end_epoch(row, score=row["val_score"])

    if not run.is_main:  # under torchrun process 0 alone tests and writes the results
        return 0
    # Test once, with the weights chosen on validation (or the last ones).
    best = run.best_weights(model=model, ema=ema)
    test_idx = split["test"][:256] if cfg["dry_run"] else split["test"]
    result, named, each = test(evaluated, heads, faces, test_idx, y_all[test_idx], cfg, run.folder, device)
    result = run.finish(
        {
            **result,
            "best_epoch": best["epoch"],
            "best_val_score": run.best if math.isfinite(run.best) else None,
            "parameters": models.count_parameters(model),
            "split_sizes": {k: len(v) for k, v in split.items()},
            **({"split_seed": cfg["split_seed"]} if cfg["task"] == "utkface" else {}),
        }
    )
    print(
        ", ".join(f"{n} {v:.4f}" for n, v in named)
        + (f", age MAE {each['age']:.2f}" if "age" in each else "")
        + f" on the test part, with the weights of epoch {best['epoch']}; training took {run.train_seconds:.0f}s on "
        f"{result['device']}; results in {run.folder}"
    )
    return 0


def plot_curves(history: list[dict], path: Path):
    """Training loss and validation score per epoch; the accuracy panel only where there is a validation part."""
    if any(h["val_score"] is not None for h in history):
        metrics.plot_curves(
            [{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_acc": h["val_score"]} for h in history], path
        )
    else:
        metrics.plot_lines([("training loss", {"train": [(h["epoch"], h["train_loss"]) for h in history]})], path)


def test(evaluated, heads, faces, test_idx, y_test, cfg, folder, device) -> tuple[dict, list, dict]:
    """Each head's test scores and pictures, gender by true age group; (results, [(name, accuracy)], {head: score})."""
    predictions = [p.cpu() for p in predict(evaluated, faces.images[test_idx].to(device), heads, cfg)]
    result = {"test_score": None, "heads": {}}
    result["test_score"], each = score(heads, predictions, y_test)
    group_names = data.age_group_names(cfg["age_groups"])
    age_groups = None  # each test face's true age group, where the data has ages (UTKFace)
    if "age" in faces.columns:
        age_groups = data.age_group(faces.targets[test_idx, faces.columns.index("age")], cfg["age_groups"])
    for h, (head, prediction) in enumerate(zip(heads, predictions)):
        truth = y_test[:, h]
        if head["kind"] == "age":
            result["heads"]["age"] = metrics.error_summary(prediction, truth, age_groups, group_names)
            metrics.plot_error_histogram(prediction - truth, folder / "age-errors.png")
            print(f"age: mean absolute error {result['heads']['age']['mae']:.2f} years")
            continue
        decided = decide(head, prediction)
        cm = metrics.confusion_matrix(decided, truth, len(head["classes"]))
        result["heads"][head["name"]] = metrics.summarize(cm, head["classes"])
        if head["name"] == "gender" and age_groups is not None:
            # children's faces are where gender goes wrong: its accuracy per true age group shows how much
            by_group = metrics.mean_by_group(decided == truth, age_groups, group_names)
            result["heads"]["gender"]["accuracy_by_age_group"] = by_group
            print(
                "gender accuracy by age group: "
                + ", ".join(f"{n} {100 * v:.1f}%" for n, v in by_group.items() if v is not None)
            )
        if len(heads) <= 6:  # forty attributes get one bar chart instead
            metrics.plot_confusion(cm, head["classes"], folder / f"confusion-{head['name']}.png")
            print(f"{head['name']}:\n" + metrics.format_table(metrics.per_class_table(cm, head["classes"])))
    named = [(name, v) for name, v in each.items() if name != "age"]
    if len(named) > 6:
        result["mean_attribute_accuracy"] = sum(v for _, v in named) / len(named)
        metrics.plot_bars(
            [n for n, _ in named],
            [v for _, v in named],
            folder / "attributes.png",
            f"test accuracy per attribute (mean {100 * result['mean_attribute_accuracy']:.2f}%)",
        )
        print(metrics.format_table([{"attribute": n, "accuracy": v} for n, v in named]))
    result["test_accuracy"] = {n: round(v, 5) for n, v in named}
    return result, named, each


# ----------------------------------------------------------------------------- inference on photos


def predict_photos(args):
    device = training.pick_device(args.device)
    ckpt = runs.load_checkpoint(args.checkpoint, map_location=device, needs=PREDICT_KEYS)
    where, cfg, heads = Path(args.checkpoint), {**ckpt["config"], "precision": args.precision}, ckpt["heads"]
    if not {"task", "image_size", "tta"} <= cfg.keys() or not isinstance(heads, list):
        raise runs.RunError(f"{where} was not saved by train_attributes.py: use a checkpoint from runs/attributes/")
    model = make_model(cfg, sum(outputs(h) for h in heads), device)
    with runs.loading(where, "weights"):
        model.load_state_dict(ckpt.get("ema") or ckpt["model"])  # the averaged weights when the run kept them

    def describe(crops):
        predictions = predict(model, crops.to(device), heads, cfg)
        faces = []
        for i in range(len(crops)):
            said, shown = [], []
            for head, prediction in zip(heads, predictions):
                p = prediction[i]
                if head["kind"] == "age":
                    # two heads judge age: the group's softmax and the mean of this distribution, which may
                    # fall in another group (60+ and 55 years), so each says which it is
                    said.append(f"age {p:.0f} years (mean of the age head)")
                    shown.append(f"age {p:.0f}")
                elif head["kind"] == "binary":
                    said.append(f"{head['name']} {p:.2f}")
                    shown += [head["name"]] if p > 0.5 else []
                else:
                    k = int(p.argmax())
                    said.append(f"{head['name']} {head['classes'][k]} {p[k]:.2f}")
                    name = head["name"].replace("_", " ")
                    shown.append(
                        f"{name} {head['classes'][k]}"
                        if len(heads) >= 4 or head["name"] == "age_group"
                        else head["classes"][k]
                    )
            faces.append((", ".join(said), ", ".join(shown[:4]) or "none of the attributes"))
        return faces

    size = tuple(cfg["image_size"]) if len(cfg["image_size"]) == 2 else cfg["image_size"][0]
    data.predict_photos(
        args.predict,
        runs.predictions_folder(args),
        "attributes",
        describe,
        size,
        grayscale=False,
        margin=PHOTO_MARGIN[cfg["task"]],
        device=str(device),
        inside=True,
    )
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["train_attributes.py", *argv])
    return runs.one_line_errors(lambda: predict_photos(args) if args.predict else train(args, command), data.DataError)


if __name__ == "__main__":
    sys.exit(main())
