"""Evidence for ensembles on one GPU, in one command: the recipe with 3 seeds, ensembles of 4 and 8 networks
trained at once, an ensemble distilled into one network, and the loop benchmark; a Markdown table of the results.

    make gpu-evidence DATA=data/fer2013                         # one GPU, within 9 minutes (--deadline)
    make gpu-evidence DATA=data/fer2013 ARGS="-- --epochs 60"   # every training shortened, to fit a smaller slot
    python benchmarks/gpu_evidence.py --small                   # CPU smoke run on synthetic faces, under a minute

Each training is train_emotion.py in a subprocess (the recipe: its defaults, with --compile), its run folder and its
output (<name>.log) under --runs; the benchmark is benchmarks/bench_emotion.py --compile. It prints, and writes to
--out after every row, a table: run, wall time (of the whole run: data, compiling, training and test), training time,
PublicTest accuracy and, for an ensemble, its members' mean PublicTest accuracy. A row that fails says so in the
table and the others still run. Rows not done by --deadline are stopped (a training saves its last.pt) or not started:
the same command again keeps the finished rows, resumes the stopped one and runs the rest. The rows the question is
about run first (one recipe run, the teacher ensemble, its distilled network, the other ensemble), so that a short slot
still answers it; the other seeds and the benchmark, measured before (README.md), come last.
"""

import atexit
import importlib.util
import json
import os
import runpy
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not a package
if "--small" in sys.argv[1:]:  # this script's or gpu_suite.py's (which imports this module first)
    # tiny operators on a CPU: OpenMP's threads would spin between them for most of the CPU time (gpu_suite.py
    # --small: 94 s of CPU against 34 s when they sleep). OpenMP reads this when torch loads, so before it is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from facenets import runs  # noqa: E402

# --small: each run checks its whole pipeline (train, save, test, metrics) in seconds, on 120 synthetic faces
SMALL_TRAINING = [
    *("--data", "synthetic", "--synthetic-count", "120", "--width", "4", "--batch-size", "16"),
    *("--dry-run", "--device", "cpu"),
]
SMALL_BENCH = [
    *("--small", "--synthetic-count", "120", "--width", "4", "--batch-size", "16", "--epochs", "1"),
    *("--steps", "2", "--warmup", "1", "--workers", "0", "--device", "cpu"),
]
# --once leaves out the rows that repeat another's pipeline
REPEATS = {"recipe-seed1", "recipe-seed2", "ensemble-8"}


def build_parser():
    p = runs.FlagParser(__doc__)
    p.add_argument(
        "--data", default="data/fer2013", help="FER2013 (image folders, .zip or .csv); --small uses synthetic faces"
    )
    p.add_argument("--runs", default="runs/gpu-evidence", help="folder for the run folders, the logs and bench.json")
    p.add_argument("--out", default="gpu-evidence.md", help="the Markdown table, rewritten after every row")
    p.add_argument(
        "--teacher",
        type=int,
        default=4,
        choices=(4, 8),
        help="which ensemble the distilled network learns "
        "from: 4 costs less per step, since the teacher runs on every batch",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=510,
        help="seconds after which no row starts and a running one is "
        "stopped (9 minutes less half a minute to write the table)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="CPU smoke run on synthetic faces: vgg width 4 on 120 faces, "
        "each training a --dry-run in a fork of this process, the benchmark's --small for one epoch",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="with --small: each pipeline once (seed 0, the ensemble of 4, the "
        "distilled network, the benchmark), without seeds 1 and 2 and the ensemble of 8: gpu_suite.py --small",
    )
    p.add_argument(
        "extra", nargs="*", default=[], help="after --: train_emotion.py flags for every training, e.g. -- --epochs 60"
    )
    return p


def rows(args) -> list[tuple[str, str, list[str]]]:
    """(what, run name, the flags of train_emotion.py or of the bench), in the order they run."""
    training = [*(SMALL_TRAINING if args.small else ["--data", args.data, "--compile"]), *args.extra]
    seeds = [(f"recipe, seed {seed}", f"recipe-seed{seed}", [*training, "--seed", str(seed)]) for seed in (0, 1, 2)]
    ensembles = {n: (f"ensemble of {n}", f"ensemble-{n}", [*training, "--ensemble", str(n)]) for n in (4, 8)}
    teacher = Path(args.runs) / f"ensemble-{args.teacher}" / "best.pt"
    distilled = (
        f"one network distilled from the ensemble of {args.teacher}",
        "distilled",
        [*training, "--distill", str(teacher)],
    )
    bench = [
        *(SMALL_BENCH if args.small else ["--data", args.data, "--compile"]),
        "--out",
        str(Path(args.runs) / "bench.json"),
    ]
    every = [
        seeds[0],
        ensembles[args.teacher],
        distilled,
        ensembles[12 - args.teacher],
        *seeds[1:],
        ("bench_emotion.py", "bench", bench),
    ]
    return [row for row in every if not (args.once and row[1] in REPEATS)]


# --small runs each script in a fork of this process, which imported torch and facenets once: a Python process that
# imports them costs ~4 s of CPU, most of a --small row's. The fork runs the script as __main__ with its own argv and
# its output in the row's log, as `python script.py ...` does, less the imports; a GPU run starts real processes.
FORK = False


def preload():
    """Import once what every script imports, before the first fork (no thread has started yet)."""
    import torchvision.transforms.v2  # noqa: F401

    from facenets import augment, data, metrics, models, training  # noqa: F401

    if importlib.util.find_spec("facenet_pytorch"):
        import facenet_pytorch  # noqa: F401


class Forked:
    """What run_until and gpu_suite.py ask of a subprocess.Popen, for `python script.py flags...` run in a fork."""

    def __init__(self, command: list[str], out):
        script, argv = command[1], command[2:]
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode, self.pid = None, os.fork()
        if self.pid:
            return
        code = 1
        try:  # the child: never returns into its parent's code
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            # line-buffered, as PYTHONUNBUFFERED makes a process's: each line reaches the log when printed
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            sys.argv = [script, *argv]
            sys.path.insert(0, str(Path(script).parent))
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def start(command: list[str], out):
    """command started with its output in the open file out: in a fork with FORK (a Python script), else a process."""
    if FORK and command[0] == sys.executable and command[1].endswith(".py"):
        return Forked(command, out)
    # unbuffered: each line reaches the log when printed (gpu_suite.py stops a training by what its log says)
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_until(command: list[str], log: Path, deadline: float) -> str | None:
    """Run command with its output in log; None when it succeeded, else why not. Past the deadline it is stopped as
    a cluster's SIGTERM stops it (a training saves its position first). Not SIGINT: a job started in the background
    (nohup, &) ignores it, and so do its children."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        child = start(command, out)
        try:
            status = child.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return "stopped at --deadline: the same command goes on with it"
    if status:
        lines = log.read_text(errors="replace").strip().splitlines()
        last = lines[-1].replace("|", "/") if lines else "no output"  # a | would split the table's cell
        return f"failed (exit {status}): {last}"
    return None


def run_row(name: str, flags: list[str], folder: Path, deadline: float) -> dict:
    """One row of the table: what the run's metrics.json (or the bench's JSON) says, or why there is none."""
    if name == "bench":
        done = folder / "bench.json"
        if not done.is_file():
            start = time.monotonic()
            why = run_until(
                [sys.executable, str(ROOT / "benchmarks" / "bench_emotion.py"), *flags], folder / "bench.log", deadline
            )
            if why:
                return {"notes": why}
            runs.write_json(done, {**json.loads(done.read_text()), "wall_seconds": time.monotonic() - start})
        result = json.loads(done.read_text())
        speed, timed = result["images_per_second"], result["time_to_accuracy"] or {}
        reached = (timed.get("reached") or {}).get("0.70")
        return {
            "wall": result["wall_seconds"],
            "training": timed.get("train_seconds"),
            "accuracy": timed.get("final_accuracy"),
            "device": result["device"],
            "notes": f"facenets {speed['facenets']:,.0f} img/s vs DataLoader {speed['reference']:,.0f} img/s "
            f"({result['ratio']:.1f}x); 70% after " + (f"{reached['train_seconds']:.0f} s" if reached else "never"),
        }
    run = folder / name
    if not (run / "metrics.json").is_file():
        # a run stopped earlier goes on where it was; a new one starts
        flags = (
            ["--resume", str(run)] if (run / "last.pt").is_file() else [*flags, "--out", str(folder), "--name", name]
        )
        why = run_until([sys.executable, str(ROOT / "train_emotion.py"), *flags], folder / f"{name}.log", deadline)
        if why:
            return {"notes": why}
    result = json.loads((run / "metrics.json").read_text())
    public = result["test_accuracy_by_usage"].get("PublicTest", result["test_accuracy"])
    members = result.get("mean_member_test_accuracy_by_usage", {}).get(
        "PublicTest", result.get("mean_member_test_accuracy")
    )
    notes = "" if members is None else f"members: {', '.join(f'{a:.2%}' for a in result['member_test_accuracies'])}"
    if "teacher_test_accuracy" in result:
        notes = (
            f"teacher on all test images {result['teacher_test_accuracy']:.2%}, "
            f"the student {result['test_accuracy']:.2%}"
        )
    return {
        "wall": result["wall_seconds"],
        "training": result["train_seconds"],
        "accuracy": public,
        "members": members,
        "notes": notes,
        "device": result["device"],
    }


def table(done: list[tuple[str, dict]], once: bool = False) -> str:
    def cell(value, unit):
        return "-" if value is None else f"{value:.1f} s" if unit == "s" else f"{value:.2%}"

    device = next((row["device"] for _, row in done if "device" in row), "no device: no row finished")
    lines = [
        f"Evidence for ensembles, {time.strftime('%Y-%m-%d')}, on {device} (train_emotion.py's device_name)",
        "",
        "| run | wall time | training | PublicTest | members' mean | notes |",
        "|---|---|---|---|---|---|",
    ]
    for what, row in done:
        lines.append(
            f"| {what} | {cell(row.get('wall'), 's')} | {cell(row.get('training'), 's')} | "
            f"{cell(row.get('accuracy'), '%')} | {cell(row.get('members'), '%')} | {row.get('notes', '')} |"
        )
    if once:
        lines += [
            "",
            "--once: seeds 1 and 2 and the ensemble of 8 left out: "
            "they repeat the pipelines of seed 0 and the ensemble of 4.",
        ]
    seeds = [row["accuracy"] for what, row in done if what.startswith("recipe") and row.get("accuracy") is not None]
    if len(seeds) > 1:
        lines += [
            "",
            f"The recipe over {len(seeds)} seeds: mean {statistics.mean(seeds):.2%}, "
            f"from {min(seeds):.2%} to {max(seeds):.2%}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    global FORK
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.once and not args.small:
        parser.error("--once is for --small: on a GPU every row is evidence")
    deadline = time.monotonic() + args.deadline
    if args.small:
        FORK = True
        preload()
    folder, out = runs.make_folder(args.runs), Path(args.out)
    done = []
    try:
        for what, name, flags in rows(args):
            if time.monotonic() > deadline:
                row = {"notes": "not started: past --deadline; the same command runs it"}
            elif name == "distilled" and not (folder / f"ensemble-{args.teacher}" / "best.pt").is_file():
                row = {"notes": f"not run: its teacher, the ensemble of {args.teacher}, has no best.pt"}
            else:
                print(f"{what} ...", flush=True)
                row = run_row(name, flags, folder, deadline)
            done.append((what, row))
            runs.replace_atomically(out, lambda tmp: tmp.write_text(table(done, args.once)))
    except KeyboardInterrupt:
        print("\nstopped (Ctrl-C): the same command goes on where this one stopped", file=sys.stderr)
        return 130
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(done, args.once))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
