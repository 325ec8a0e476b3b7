"""Ablation of the emotion recipe: train_emotion.py once per variant and seed, then what each part is worth.

    make ablation DATA=data/fer2013                 # what each part of the recipe is worth, seeds 0, 1
    python benchmarks/ablate_emotion.py --data data/fer2013 --parallel 4 # 4 runs at once: one GPU has room for them
    python benchmarks/ablate_emotion.py --small                          # CPU smoke run on synthetic faces
    make ablation DATA=data/fer2013 ARGS='--variants "upsample 2" resnet18 sam "width 96" recipe "fc head" cutmix \
        "batch 256" "batch 128"'
                                                                         # candidates the recipe does not have yet

A variant is the recipe (train_emotion.py's defaults) with one thing changed. Every run holds out a stratified 10%
of Training for validation: the table gives that validation accuracy, which is what a recipe may be chosen by, and
the PublicTest accuracy, which is only reported. The recipe's own runs also show, at no extra cost, PublicTest
accuracy without the test-time augmentation and without the weight average. Run folders, each run's output
(<name>.log) and flags (<name>.flags), and results.json go to --out; the table is printed last, as Markdown for
REPRODUCING.md. The same command again continues an ablation that was stopped (Ctrl-C) or cut short: finished runs
are kept, stopped ones resume.
"""

import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not a package
from facenets import runs  # noqa: E402

VARIANTS = {  # name: the train_emotion.py flags that differ from the recipe
    "recipe": [],
    "no mixup": ["--mixup", "0"],
    "no label smoothing": ["--label-smoothing", "0"],
    "no random erasing": ["--erasing", "0"],
    "with affine": ["--rotate", "10", "--zoom", "0.1", "--translate", "0.1"],
    "no affine": ["--rotate", "0", "--zoom", "0", "--translate", "0"],  # for a base given after -- with an affine
    "half the peak lr": ["--lr", "0.1"],
    # candidates: what the recipe might still gain (not run by default)
    "fc head": ["--model-opt", "hidden=(4096, 4096)"],
    "cutmix": ["--mixup", "0", "--cutmix", "1"],
    "width 96": ["--width", "96"],
    "upsample 2": ["--model-opt", "upsample=2"],
    "resnet18": ["--model", "resnet18"],
    # smaller batches: more, noisier steps at the same lr per image, and the same weight-average horizon in epochs
    "batch 256": ["--batch-size", "256", "--lr", "0.1", "--ema", "0.9995"],
    "batch 128": ["--batch-size", "128", "--lr", "0.05", "--ema", "0.99975"],
    "sam": ["--sam", "0.05"],
}
# what each part of the recipe is worth; "no affine" is left out since the recipe has none: it would repeat "recipe"
DEFAULT_VARIANTS = ["recipe", "no mixup", "no label smoothing", "no random erasing", "with affine", "half the peak lr"]
SMALL = dict(
    data="synthetic",
    seeds=[0],
    epochs=1,
    variants=["recipe", "no mixup"],
    extra=["--width", "8", "--batch-size", "64", "--synthetic-count", "700"],
)


def build_parser():
    p = runs.FlagParser(__doc__)
    p.add_argument("--data", default="data/fer2013", help="FER2013 (image folders, .zip or .csv), or 'synthetic'")
    p.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME", help="which variants: " + "; ".join(VARIANTS)
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per variant and seed")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run; None: the recipe's")
    p.add_argument(
        "--parallel", type=int, default=1, help="runs at once (a GPU loop at these sizes leaves room for 3-4)"
    )
    p.add_argument("--out", default="runs/ablation", help="folder for the run folders, logs and results.json")
    p.add_argument(
        "--small",
        action="store_true",
        help="CPU smoke run; flags given explicitly still win. Sets "
        + ", ".join(f"--{k} {v}" for k, v in SMALL.items() if k != "extra")
        + " and width 8, batch 64, 700 faces",
    )
    p.add_argument(
        "extra",
        nargs="*",
        default=[],
        help="after --: train_emotion.py flags for every run, before the variant's "
        "own (which win), e.g. -- --device cpu",
    )
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.small:
        p.set_defaults(**SMALL)
        args = p.parse_args(argv)
        args.extra = SMALL["extra"] + args.extra  # flags after -- come later, so they win
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from: " + "; ".join(VARIANTS))
    if args.parallel < 1 or (args.epochs is not None and args.epochs < 1):
        p.error("--parallel and --epochs must be positive")
    return args


def run_name(variant, seed):
    return f"{variant.replace(' ', '_').replace('(', '').replace(')', '')}-seed{seed}"


def train_flags(args, variant, seed):
    """What makes the run what it is (where it goes aside); the variant's flags last, so they win."""
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    return ["--data", args.data, "--val-fraction", "0.1", "--seed", str(seed), *epochs, *args.extra, *VARIANTS[variant]]


def command(args, variant, seed):
    return [
        sys.executable,
        str(ROOT / "train_emotion.py"),
        "--out",
        str(args.out),
        "--name",
        run_name(variant, seed),
        *train_flags(args, variant, seed),
    ]


def run_all(args):
    """Start every run, at most --parallel at a time (seed-major, so a cut-short ablation has whole seeds).

    Runs already in --out's results.json are kept and a run stopped with Ctrl-C goes on from its last.pt, if their
    flags are the same: the same command continues an ablation that was stopped or cut short.
    """
    out = runs.make_folder(args.out)
    results = {}
    if (out / "results.json").exists():
        results = runs.read_json(out / "results.json", "an ablation's results", "pick a new --out")
    queue = []
    for variant, seed in [(v, s) for s in args.seeds for v in args.variants]:
        name, flags = run_name(variant, seed), shlex.join(train_flags(args, variant, seed))
        flags_file = out / f"{name}.flags"  # what the run was started with: a kept or resumed run must match it
        if name in results or (out / name / "last.pt").exists():
            started_with = flags_file.read_text() if flags_file.exists() else "unknown"
            if started_with != flags:
                raise runs.RunError(
                    f"{out / name} was run with other flags ({started_with}, now {flags}): pick a new --out"
                )
            if name in results:
                continue
        queue.append((variant, seed, name, flags))
    running = {}
    try:
        while queue or running:
            while queue and len(running) < args.parallel:
                variant, seed, name, flags = queue.pop(0)
                cmd, folder = command(args, variant, seed), out / name
                if (folder / "last.pt").exists():
                    cmd = [*cmd[:2], "--resume", str(folder)]
                elif folder.exists():  # started, but stopped before anything worth keeping was saved
                    shutil.rmtree(folder)
                (out / f"{name}.flags").write_text(flags)
                log = open(out / f"{name}.log", "a")
                running[(variant, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
            time.sleep(0.5)
            for key, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                name = run_name(*key)
                metrics_file = out / name / "metrics.json"
                if proc.returncode or not metrics_file.exists():
                    print(f"{name}: failed (exit {proc.returncode}), see {out / (name + '.log')}")
                    continue
                results[name] = {"variant": key[0], "seed": key[1], **json.loads(metrics_file.read_text())}
                r = results[name]
                print(
                    f"{name}: validation {spread([r['best_val_accuracy']])}, "
                    f"PublicTest {spread([r['test_accuracy']])}, "
                    f"{r['train_seconds']:.0f} s"
                )
                runs.write_json(
                    out / "results.json", results
                )  # after every run: a cut-short ablation keeps what finished
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: each saves its last.pt, so wait for them
        for proc, log in running.values():
            proc.wait()
            log.close()
        raise
    return results


def spread(values):
    """Mean and range of accuracies; runs without a validation split (e.g. a --split given after --) have None."""
    values = [v for v in values if v is not None]
    if not values:
        return "none"
    return f"{statistics.mean(values):.2%}" + (f" ({min(values):.2%}-{max(values):.2%})" if len(values) > 1 else "")


def table(results, variants):
    variants = sorted(variants, key=lambda v: v != "recipe")  # the recipe's row first, the others as given
    by_variant = {v: [r for r in results.values() if r["variant"] == v] for v in variants}
    base = by_variant.get("recipe") or []
    base_test = statistics.mean(r["test_accuracy"] for r in base) if base else None
    rows = [("variant", "flags", "seeds", "validation", "PublicTest", "vs recipe", "train s")]
    for v, rs in by_variant.items():
        if not rs:
            continue
        test = [r["test_accuracy"] for r in rs]
        gain = f"{statistics.mean(test) - base_test:+.2%}" if base_test is not None and v != "recipe" else ""
        rows.append(
            (
                v,
                " ".join(VARIANTS[v]) or "(none)",
                str(len(rs)),
                spread([r["best_val_accuracy"] for r in rs]),
                spread(test),
                gain,
                f"{statistics.mean(r['train_seconds'] for r in rs):.0f}",
            )
        )
    for key, what in (
        ("test_accuracy_without_tta", "recipe, tested without TTA"),
        ("test_accuracy_without_ema", "recipe, tested without EMA"),
    ):
        test = [r[key] for r in base if key in r]
        if test:
            rows.append(
                (what, "(same runs)", str(len(test)), "", spread(test), f"{statistics.mean(test) - base_test:+.2%}", "")
            )
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        results = run_all(args)
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a run's log or flags file that cannot be written
        print(f"error: {e.strerror or e} ({e.filename}): free some space or make --out writable", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped: the runs saved where they were; the same command continues the ablation", file=sys.stderr)
        return 130
    print(
        f"\n{len(results)} runs finished in {args.out}; {time.perf_counter() - started:.0f} s wall, "
        f"{args.parallel} at a time\n"
    )
    if not results:
        print("error: no run finished; the logs in", args.out, "say why", file=sys.stderr)
        return 2
    print(table(results, args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
