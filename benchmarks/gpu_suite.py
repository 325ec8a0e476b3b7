"""The GPU suite: every script on one GPU, in named parts sized to short slots; a Markdown table per part.

    make gpu-suite ARGS="--part smoke"                                      # first on a fresh machine: no data, ~2 min
    make gpu-suite ARGS="--part gan --pack .data/celeba-faces-64.tar.gz"    # a part on its pack (gpu_pack.py)
    make gpu-suite DATA=../shared/data ARGS="--part attributes"             # a part on a folder holding the data sets
    make gpu-suite ARGS=--small                          # every part on CPU, synthetic: ~35 s on 2 cores

Parts, run in this order by default (--part NAME runs one):
  smoke       no data: each script on synthetic faces for an epoch on CUDA, fp32, and bf16 with --compile; emotion's
              --ensemble 2; a training stopped by SIGTERM, then --resume; --predict (MTCNN on the GPU: needs
              facenet-pytorch) and train_gan.py --sample
  emotion     fer2013: benchmarks/gpu_evidence.py (the recipe x 3 seeds, ensembles of 4 and 8, a distilled net,
              the bench)
  attributes  utkface: make utkface and make utec, with --compile
  gan         celeba-faces: the Concepcion DCGAN for its report's 30 epochs and the recipe (make gan), --compile, each
              with a --time-budget so that both fit; quality in ONet features needs facenet-pytorch, else the row
              says so
  reports     fer2013: the report rows REPRODUCING.md owes to a GPU: Udine R1 and R2 (its common flags, 50 epochs)

Each training is its script in a subprocess, its run folder and its output (<name>.log) under --out/<part>/; the part's
table goes to --out/<part>.md after every row and is printed at the end. A part stops at its --deadline: a running
training is stopped (it saves last.pt) and the rest is not started; the same command again keeps the finished rows,
resumes the stopped one and runs the rest. A failed row says why in the table and the others still run; the exit
status is 1 when a row failed. --pack FILE unpacks a pack once into a temporary folder kept for later calls (a
resumed training finds its data where it was), and the parts read their data set from there.

--small checks the suite itself on CPU, each part with the same table: each training on 120 synthetic faces with a
tiny network in bf16, the parts' rows as two batches (--dry-run), no --compile (inductor compiles for minutes on a
CPU). The smoke part trains each script once (one bf16 row for the GPU's fp32 and bf16 --compile rows); the emotion
part runs gpu_evidence.py --small --once (without the rows that repeat a pipeline). Each training runs in a fork of
this process, which imported torch once, instead of a new Python process (~4 s of CPU each for the imports).
"""

import importlib.util
import json
import re
import signal
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # benchmarks/ is not a package
import gpu_evidence  # noqa: E402
from gpu_evidence import run_until  # noqa: E402

from facenets import runs  # noqa: E402

PARTS = ("smoke", "emotion", "attributes", "gan", "reports")
DATA_SET = {"emotion": "fer2013", "attributes": "utkface", "gan": "celeba-faces", "reports": "fer2013"}
HAVE_FACENET = importlib.util.find_spec("facenet_pytorch") is not None
PHOTO = ROOT / "docs" / "gan-recipe-cpu-45min.png"  # 32 generated faces, all found by MTCNN: a photo that travels
# REPRODUCING.md's common Udine flags (its "U")
UDINE = [
    "--split",
    "udine",
    "--sobel-channels",
    "--optimizer",
    "adam",
    "--scheduler",
    "none",
    "--no-augment",
    "--crop",
    "0",
    "--tta",
    "none",
    "--ema",
    "0",
    "--batch-size",
    "128",
    "--label-smoothing",
    "0",
    "--weight-decay",
    "0",
]


@dataclass
class Row:
    what: str
    name: str  # its run folder and <name>.log
    script: str  # train_emotion.py, train_attributes.py or train_gan.py
    flags: list[str]
    # train: read from its metrics.json; stop: stopped by SIGTERM in epoch 2, then resumed; use: --predict, --sample
    kind: str = "train"


def build_parser():
    p = runs.FlagParser(__doc__)
    p.add_argument("--part", default="all", choices=("all", *PARTS), help="the part to run; all: every part in order")
    p.add_argument(
        "--data",
        default="data",
        help="a folder holding the data sets as ../shared/data does: fer2013/, "
        "utkface/, celeba-faces/ (a part whose data set is missing says so in its table)",
    )
    p.add_argument("--pack", help="a .tar.gz of benchmarks/gpu_pack.py, read instead of --data")
    p.add_argument(
        "--out",
        help="folder for each part's table (<part>.md), its run folders and logs (<part>/); "
        "default runs/gpu-suite, with --small runs/gpu-suite-small (a finished row is kept, so the two must "
        "not share a folder)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=450,
        help="seconds each part may take before a running training "
        "is stopped and no row starts (7.5 minutes: a part and its start-up fit a 10-minute call)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="every part on CPU on synthetic data with tiny networks and "
        "counts, two batches per training (--dry-run) where an epoch is not the point, no --compile, each training "
        "in a fork of this process: a CI check",
    )
    return p


def unpack(pack: Path) -> Path:
    """pack unpacked once into a temporary folder that later calls find again (a stopped training resumes from the
    data path it started with); the folder holding the data set."""
    try:
        stamp = f"{pack.resolve()} {pack.stat().st_size} {pack.stat().st_mtime_ns}"
        target = Path(tempfile.gettempdir()) / f"facenets-pack-{pack.name.split('.')[0]}"
        if (target / ".unpacked").is_file() and (target / ".unpacked").read_text() == stamp:
            return target
        print(f"unpacking {pack} into {target} ...", flush=True)
        with tarfile.open(pack) as archive:
            archive.extractall(target, filter="data")  # "data": no absolute paths, links or devices out of a pack
        (target / ".unpacked").write_text(stamp)
        return target
    except (OSError, tarfile.TarError) as e:
        raise runs.RunError(f"cannot unpack --pack {pack} ({e}): pass a .tar.gz of benchmarks/gpu_pack.py") from None


# ---------------------------------------------------------------- the rows of each part


# --small: each training on the fewest synthetic faces that still make a few batches an epoch, in bf16 (what "auto"
# picks on a GPU), with tiny networks; every row proves its pipeline, not a result
SYNTHETIC = ["--data", "synthetic", "--synthetic-count", "120"]
SYNTHETIC_GAN = [*SYNTHETIC, "--holdout", "20", "--quality-count", "20", "20", "--quality-every", "0"]
TINY, TINY_GAN = ["--width", "4", "--batch-size", "16"], ["--width", "16", "--batch-size", "16", "--image-size", "32"]
SMALL = {"emotion": [*SYNTHETIC, *TINY], "attributes": [*SYNTHETIC, *TINY], "gan": [*SYNTHETIC_GAN, *TINY_GAN]}


def smoke_rows(small: bool, folder: Path) -> list[Row]:
    device = ["--device", "cpu" if small else "cuda"]  # cuda, not auto: a machine without a GPU fails, not falls back
    faces = ["--data", "synthetic", "--synthetic-count", "2000"]
    synthetic = {
        "emotion": faces,
        "attributes": faces,
        "gan": [*faces, "--holdout", "500", "--quality-count", "200", "500"],
    }
    rows = []
    for task, flags in (SMALL if small else synthetic).items():
        script, epoch = f"train_{task}.py", [*flags, *device, "--epochs", "1"]
        if small:  # fp32 and bf16 prove the same pipeline; inductor compiles for minutes on a CPU
            epochs = [
                Row(
                    f"{task}: an epoch, bf16 (--small: the fp32 and --compile rows are GPU only)",
                    f"{task}-bf16",
                    script,
                    [*epoch, "--precision", "bf16"],
                )
            ]
        else:
            epochs = [
                Row(f"{task}: an epoch, fp32", f"{task}-fp32", script, [*epoch, "--precision", "fp32"]),
                Row(
                    f"{task}: an epoch, bf16, --compile",
                    f"{task}-bf16-compile",
                    script,
                    [*epoch, "--precision", "bf16", "--compile"],
                ),
            ]
        rows += epochs
        if task == "emotion":
            ensemble = [*epoch, "--precision", "bf16", "--ensemble", "2"]
            rows.append(Row("emotion: --ensemble 2, an epoch, bf16", "emotion-ensemble2", script, ensemble))
        # enough epochs that a GPU is still training when the SIGTERM comes
        rows.append(
            Row(
                f"{task}: stopped by SIGTERM in epoch 2, then --resume",
                f"{task}-resumed",
                script,
                [*flags, *device, "--epochs", "2" if small else "20", *(["--precision", "bf16"] if small else [])],
                kind="stop",
            )
        )
        trained = folder / epochs[0].name / "best.pt"  # the first epoch row's network
        checkpoint = ["--checkpoint", str(trained), "--out", str(folder / f"{task}-use")]
        if task == "gan":
            rows.append(Row("gan: --sample 16", "gan-sample", script, ["--sample", "16", *checkpoint, *device], "use"))
        else:
            rows.append(
                Row(
                    f"{task}: --predict, MTCNN on {device[1]}",
                    f"{task}-predict",
                    script,
                    ["--predict", str(PHOTO), *checkpoint, *device],
                    "use",
                )
            )
    return rows


def part_rows(part: str, small: bool, data: Path) -> list[Row]:
    """The trainings of the attributes, gan and reports parts; data is the part's data set."""

    def on(small_size=()):  # --small: two batches on CPU in bf16 at small_size; on the GPU: compiled
        return [*small_size, "--dry-run", "--device", "cpu", "--precision", "bf16"] if small else ["--compile"]

    if part == "attributes":
        source = SYNTHETIC if small else ["--data", str(data)]
        utkface = [
            *("--width", "4" if small else "32", "--ema", "0.999", "--label-smoothing", "0.1"),
            *("--epochs", "50", "--precision", "bf16"),
        ]  # the Makefile's utkface target
        return [
            Row(
                "make utkface (vgg width 32, EMA, label smoothing, 50 epochs, bf16)"
                + (" (--small: width 4)" if small else ""),
                "utkface",
                "train_attributes.py",
                [*source, *utkface, *on(["--batch-size", "16"])],
            ),
            Row(
                "make utec (the UTEC report's Arch 2, Adam 1e-3, 30 epochs)",
                "utec",
                "train_attributes.py",
                [*source, "--preset", "utec", *on(["--batch-size", "16"])],
            ),
        ]
    if part == "gan":
        source = SYNTHETIC_GAN if small else ["--data", str(data)]
        # budgets in minutes, so that both rows, their data and their final quality fit the part's deadline
        return [
            Row(
                "the Concepcion DCGAN (--preset concepcion), its report's 30 epochs, 2.5 min at most",
                "concepcion",
                "train_gan.py",
                [
                    *source,
                    *("--preset", "concepcion", "--epochs", "30", "--time-budget", "2.5"),
                    *on(["--image-size", "32", "--batch-size", "16"]),
                ],
            ),
            Row(
                "the recipe (make gan), 3 min at most",
                "recipe",
                "train_gan.py",
                [*source, "--time-budget", "3", *on(TINY_GAN)],
            ),
        ]
    source = SYNTHETIC if small else ["--data", str(data)]
    inceptions = "1" if small else "30"  # --small: one block per stage, not the report's 30
    # --small: narrow stages and head (their 10 million weights cost seconds a step on a CPU)
    narrow = ["--model-opt", "channels=(8, 16, 32, 64)", "--model-opt", "hidden=64"] if small else []
    udine = [*UDINE, *source, *narrow]
    also = " (--small: channels 8-64, hidden 64)" if small else ""
    return [
        Row(
            f"Udine R1, ConvDrop fat net, lr 1e-4, 50 epochs{also}",
            "udine-r1",
            "train_emotion.py",
            [*udine, "--model", "udine_r1", "--lr", "1e-4", "--epochs", "50", *on(["--batch-size", "16"])],
        ),
        Row(
            f"Udine R2, {inceptions} inception blocks x3, lr 1e-4, 50 epochs{also}",
            "udine-r2",
            "train_emotion.py",
            [
                *udine,
                *("--model", "udine_r2", "--model-opt", f"inceptions={inceptions}", "--lr", "1e-4", "--epochs", "50"),
                *on(["--batch-size", "16"]),
            ],
        ),
    ]


# ---------------------------------------------------------------- running a row


def script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / name)]


def train(row: Row, folder: Path, deadline: float) -> str | None:
    """Train row unless done: a stopped run resumes, a new one starts. None when it succeeded, else why not."""
    run = folder / row.name
    if (run / "metrics.json").is_file():
        return None
    fresh = [*row.flags, "--out", str(folder), "--name", row.name]
    flags = ["--resume", str(run)] if (run / "last.pt").is_file() else fresh
    return run_until([*script(row.script), *flags], folder / f"{row.name}.log", deadline)


# epoch 2 under way: the line that ends epoch 1, or on a terminal epoch 2's progress bar (a file gets no bar)
EPOCH_2 = re.compile(r"^epoch +1 |epoch 2/", re.MULTILINE)


def stop_in_second_epoch(row: Row, folder: Path, deadline: float) -> str | None:
    """Start row's training and stop it with SIGTERM once its log shows epoch 2 under way, as a cluster stops a job:
    it must save its position in the epoch and exit 130. None when it did, else why not (the caller resumes it)."""
    run, log = folder / row.name, folder / f"{row.name}.log"
    if (run / "last.pt").is_file() or (run / "metrics.json").is_file():
        return None
    command = [*script(row.script), *row.flags, "--out", str(folder), "--name", row.name]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        start = out.tell()
        child = gpu_evidence.start(command, out)
        while child.poll() is None and time.monotonic() < deadline:
            with open(log, errors="replace") as written:
                written.seek(start)
                if EPOCH_2.search(written.read()):
                    break
            time.sleep(0.05)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        status = child.wait()
    if status != 130 or not (run / "last.pt").is_file():
        return f"SIGTERM in epoch 2: exit {status}, last.pt {'kept' if (run / 'last.pt').is_file() else 'missing'}"
    return None


def summary(row: Row, result: dict) -> tuple[str, str]:
    """(result, notes) of a finished training's metrics.json."""
    epochs = f"{result['epochs_run']} epochs"
    if row.script == "train_emotion.py":
        public = result["test_accuracy_by_usage"].get("PublicTest")
        shown = f"PublicTest {public:.2%}" if public is not None else f"test {result['test_accuracy']:.2%}"
        members = result.get("member_test_accuracies")
        return (
            f"{shown}, mean per-class {result['mean_per_class_accuracy']:.2%}",
            epochs + (f"; members {', '.join(f'{a:.2%}' for a in members)}" if members else ""),
        )
    if row.script == "train_attributes.py":
        heads = [f"{head.replace('_', ' ')} {accuracy:.2%}" for head, accuracy in result["test_accuracy"].items()]
        age = result["heads"].get("age")
        return ", ".join(heads + ([f"age MAE {age['mae']:.2f} years"] if age else [])), epochs
    quality = result["quality"]
    if quality is None:
        why = "facenet-pytorch is not installed" if not HAVE_FACENET else "see the log"
        return f"quality not measured: {why}", f"{epochs}; grid.png in the run folder"
    return (
        f"Frechet {quality['frechet_distance']:.2f} (real vs real {quality['real_vs_real_frechet']:.3f}), "
        f"precision {quality['precision']:.2f}, recall {quality['recall']:.2f}, "
        f"coverage {quality['coverage']:.2f}, faces {quality['face_rate']:.1%}",
        f"{epochs}; grid.png in the run folder",
    )


def run_row(row: Row, folder: Path, deadline: float) -> dict:
    """One row of a table: wall and training time, result and notes, or why there are none."""
    if row.kind == "use":  # --predict / --sample with the fp32 row's checkpoint
        if "--predict" in row.flags and not HAVE_FACENET:
            return {"notes": "not run: facenet-pytorch is not installed (README: carry its wheel)"}
        start, log = time.monotonic(), folder / f"{row.name}.log"
        why = run_until([*script(row.script), *row.flags], log, deadline)
        said = [line for line in log.read_text(errors="replace").splitlines() if line and not line.startswith("$")]
        last = said[-1].replace("|", "/") if said else "no output"  # a | would split the table's cell
        return {"wall": time.monotonic() - start, "result": why or last, "failed": bool(why)}
    why = stop_in_second_epoch(row, folder, deadline) if row.kind == "stop" else None
    why = why or train(row, folder, deadline)
    if why:
        return {"notes": why, "failed": why.startswith(("failed", "SIGTERM"))}
    result = json.loads((folder / row.name / "metrics.json").read_text())
    shown, notes = summary(row, result)
    if row.kind == "stop":
        resumed = result.get("resumed_with")
        notes = f"{notes}; resumed with: {resumed[0]}" if resumed else f"{notes}; NOT resumed: no resumed_with"
    return {
        "wall": result["wall_seconds"],
        "training": result["train_seconds"],
        "result": shown,
        "notes": notes,
        "device": result["device"],
        "failed": row.kind == "stop" and not result.get("resumed_with"),
    }


def table(part: str, done: list[tuple[str, dict]]) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.1f} s"

    device = next((row["device"] for _, row in done if row.get("device")), "no device: no training finished")
    lines = [
        f"GPU suite, part {part}, {time.strftime('%Y-%m-%d')}, on {device}",
        "",
        "| row | wall time | training | result | notes |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {what} | {seconds(row.get('wall'))} | {seconds(row.get('training'))} | {row.get('result', '-')} | "
        f"{row.get('notes', '')} |"
        for what, row in done
    ]
    return "\n".join(lines) + "\n"


def run_part(part: str, args, root: Path | None) -> tuple[str, bool]:
    """Run one part; its table and whether a row failed."""
    folder, out = runs.make_folder(Path(args.out) / part), Path(args.out) / f"{part}.md"
    deadline = time.monotonic() + args.deadline
    data = None if args.small or part == "smoke" else root / DATA_SET[part]
    if data is not None and not data.exists():
        why = (
            f"not run: no {DATA_SET[part]} in {root}: give --data the folder holding it, or --pack its pack "
            f"(benchmarks/gpu_pack.py)"
        )
        text = table(part, [(f"part {part}", {"notes": why})])
        runs.replace_atomically(out, lambda tmp: tmp.write_text(text))
        return text, False
    if part == "emotion":  # gpu_evidence.py has the rows, the table and the resuming; it stops by the same deadline
        source = ["--small", "--once"] if args.small else ["--data", str(data)]
        why = run_until(
            [
                *script("benchmarks/gpu_evidence.py"),
                *source,
                "--runs",
                str(folder),
                "--out",
                str(out),
                "--deadline",
                str(args.deadline),
            ],
            Path(args.out) / "emotion.log",
            deadline + 90,
        )
        text = out.read_text() if out.is_file() else table(part, [])
        return text + (f"\ngpu_evidence.py {why}\n" if why else ""), bool(why)
    done = []
    for row in smoke_rows(args.small, folder) if part == "smoke" else part_rows(part, args.small, data):
        if time.monotonic() > deadline:
            result = {"notes": "not started: past --deadline; the same command runs it"}
        else:
            print(f"{part}: {row.what} ...", flush=True)
            result = run_row(row, folder, deadline)
        done.append((row.what, result))
        runs.replace_atomically(out, lambda tmp: tmp.write_text(table(part, done)))
    return table(part, done), any(row.get("failed") for _, row in done)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or ("runs/gpu-suite-small" if args.small else "runs/gpu-suite")
    failed = []
    if args.small:
        gpu_evidence.FORK = True
        gpu_evidence.preload()
    try:
        root = unpack(Path(args.pack)) if args.pack else Path(args.data)
        for part in PARTS if args.part == "all" else (args.part,):
            text, part_failed = run_part(part, args, root)
            print(f"\n{text}", flush=True)
            failed += [part] if part_failed else []
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C): the same command goes on where this one stopped", file=sys.stderr)
        return 130
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tables in {args.out}/<part>.md" + (f"; a row failed in: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
