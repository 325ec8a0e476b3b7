"""How much time and how many device syncs each step of train_emotion.py's loop costs the host.

At a tiny width and batch the network's compute is negligible, so the time per step is what the host does around
it (Python, launching kernels, waiting): on a GPU that time is a floor under every step, whatever the GPU. A sync
(.item(), float(t), int(t), bool(t) as in `if t:`, .cpu(), .tolist(), .numpy(), printing a tensor) makes the host wait
until the GPU has finished all it was given, so the host can no longer queue work ahead of it.

    python benchmarks/overhead_emotion.py                                 # this checkout
    python benchmarks/overhead_emotion.py --code . /tmp/old --repeats 5   # checkouts side by side, interleaved
    python benchmarks/overhead_emotion.py -- --ensemble 4                 # any train_emotion.py flags after --
    python benchmarks/overhead_emotion.py --small                         # CI smoke run, ~12 s on 2 cores

It runs train_emotion.main() in-process on synthetic faces and takes the time of every optimizer step (torch's
global step hook). Only what happens from the first step to the last counts: loading, building, testing and the
final save fall outside, and so the tool works on any train_emotion.py with today's flags. A first run counts,
per step, the syncs (SyncCounter: torch.Tensor's syncing methods wrapped; also usable by tests) and the operators
(OpCounter: about the kernels a GPU would be launched for); then --repeats runs without counters are timed. Each
--code runs in its own process, round-robin over the repeats, so that a busy spell of a shared machine hits all.
It prints per checkout its commit, ms per step (min-max), syncs and operators per step, and where the syncs are.
"""

import argparse
import collections
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
# The methods by which Python reads a tensor's value on the host; on a GPU each waits for the queued work
SYNC_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
    "__repr__",
)
TORCH_DIR = str(Path(torch.__file__).parent)
# Tiny network and batch (compute negligible) and 56 steps per epoch as FER2013's 28,709 images at batch 512, so
# that what the loop does once per epoch weighs per step what it weighs in the recipe: 1120 faces, 80% Training.
FLAGS = dict(width=4, batch_size=16, synthetic_count=1120, epochs=3)
SMALL = dict(epochs=1, repeats=1)


class SyncCounter:
    """Counts the calls of SYNC_METHODS on tensors while inside `with`, each with the place it came from (file:line of
    the first caller outside torch). A call made inside another (repr calling tolist) counts once.

        with SyncCounter() as syncs:
            train()
        syncs.events  # [(steps done when it happened, method, "train_emotion.py:463"), ...]

    steps_done is whatever the caller sets (a step hook, say), so that syncs can be told apart by step.
    """

    def __init__(self):
        self.events, self.steps_done, self._depth, self._originals = [], 0, 0, {}

    def __enter__(self):
        for name in SYNC_METHODS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, self._originals[name]))
        return self

    def __exit__(self, *exc):
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)
        return False

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            if self._depth == 0:
                self.events.append((self.steps_done, name, caller()))
            self._depth += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._depth -= 1

        return counted


# Operators whose output size depends on the data, so that a GPU must finish them before the host goes on
SYNCING_OPS = ("nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave")


class OpCounter(TorchDispatchMode):
    """Counts the operators run inside `with` (backward and optimizer too), views left out: roughly the kernels a GPU
    would be given. It slows every operator down, so it runs apart from the timed runs. Like SyncCounter it keeps
    (steps done, name, place) of the operators that sync on a GPU without a Tensor method: SYNCING_OPS, and
    indexing with a boolean mask (a hidden nonzero)."""

    def __init__(self):
        super().__init__()
        self.ops, self.events, self.steps_done = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and func.namespace == "aten":
            self.ops.append(self.steps_done)
        bool_mask = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in SYNCING_OPS or bool_mask:
            self.events.append((self.steps_done, name, caller()))
        return func(*args, **(kwargs or {}))


def caller():
    """file:line of the innermost frame outside torch and this file: the code that asked for the value."""
    frame = sys._getframe(2)
    while frame and (frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame else "?"


def import_from(code: Path):
    """train_emotion as checked out in `code`, with the facenets beside it."""
    sys.path.insert(0, str(code))
    import facenets
    import train_emotion

    for module in (train_emotion, facenets):
        if not Path(module.__file__).resolve().is_relative_to(code):
            sys.exit(
                f"error: {module.__name__} was already imported from {module.__file__}, not from {code}: "
                "measure each checkout in a fresh process"
            )
    return train_emotion


def train(train_emotion, flags, counters=()):
    """One training run with the counters on: the perf_counter() after every optimizer step."""
    times = []

    def step_done(optimizer, args, kwargs):
        times.append(time.perf_counter())
        for counter in counters:
            counter.steps_done = len(times)

    log = io.StringIO()  # the run's progress bar and per-epoch lines; shown only when it fails
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        for counter in counters:
            stack.enter_context(counter)
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        stack.callback(register_optimizer_step_post_hook(step_done).remove)
        status = train_emotion.main(
            ["--data", "synthetic", "--val-fraction", "0", "--tta", "none", "--out", out, "--name", "overhead", *flags]
        )
    if status != 0 or len(times) < 2:
        sys.exit(
            f"error: train_emotion.py {' '.join(flags)} ended with {status} after {len(times)} steps:\n"
            + log.getvalue()[-2000:]
        )
    return times


def no_saves_mid_epoch(train_emotion):
    """Turn off the saves every runs.SAVE_EVERY seconds (where the checkout has them): a tiny CPU step takes as long as
    a whole epoch on a GPU, so they would weigh per step many times what they weigh in a real run, and vary with the
    machine's load. The save at the end of the last epoch stays (outside what is counted)."""
    runs = getattr(train_emotion, "runs", None)
    if hasattr(runs, "SAVE_EVERY"):
        runs.SAVE_EVERY = float("inf")


def last_step(steps, epochs):
    """What counts runs from step 1 to this step (1-based): whole epochs, from the first step of the first epoch to
    the first of the last (all steps when there is one epoch), so that what the loop does once an epoch weighs per
    step as in a long run."""
    return steps - steps // epochs + 1 if epochs > 1 else steps


def by_place(events, first, last):
    """Counter{"method place": n} of the (steps done, method, place) events after step `first` and before `last`."""
    return collections.Counter(f"{name} {place}" for done, name, place in events if first <= done < last)


def commit(code: Path) -> str:
    """The checkout's short commit, marked when its files differ from it."""

    def git(*words):
        return subprocess.run(["git", "-C", str(code), *words], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "no git"
    return head + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def shape_flags(args):
    """The flags of this script that train_emotion.py has too (same names): they shape every run."""
    return [
        "--width",
        str(args.width),
        "--batch-size",
        str(args.batch_size),
        "--synthetic-count",
        str(args.synthetic_count),
        "--epochs",
        str(args.epochs),
    ]


def measure(code: Path, args) -> dict:
    """One counting run, then args.repeats timed runs of one checkout, in this process."""
    train_emotion = import_from(code)
    torch.set_num_threads(args.threads)
    no_saves_mid_epoch(train_emotion)
    flags = [*shape_flags(args), *args.extra]
    syncs, ops = SyncCounter(), OpCounter()
    last = last_step(len(train(train_emotion, flags, (syncs, ops))), args.epochs)
    places = by_place(syncs.events, 1, last) + by_place(ops.events, 1, last)
    ms = []
    for _ in range(args.repeats):  # without counters, which slow the host down
        times = train(train_emotion, flags)
        ms.append(round(1000 * (times[last - 1] - times[0]) / (last - 1), 3))
    return {
        "code": str(code),
        "commit": commit(code),
        "ms_per_step": ms,
        "steps": last - 1,
        "syncs_per_step": round(sum(places.values()) / (last - 1), 4),
        "syncs": dict(places.most_common()),
        "ops_per_step": round(sum(1 <= done < last for done in ops.ops) / (last - 1), 1),
    }


def measure_apart(args) -> list[dict]:
    """Each checkout in its own process, round-robin, so that a slow spell of a shared machine hits them alike."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, code in enumerate(args.code):
                out = Path(tmp) / f"{i}-{repeat}.json"
                command = [
                    sys.executable,
                    __file__,
                    "--code",
                    str(code),
                    "--repeats",
                    "1",
                    "--threads",
                    str(args.threads),
                    "--out",
                    str(out),
                    *shape_flags(args),
                    "--",
                    *args.extra,
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(done.stderr.strip() or f"error: {' '.join(command)} ended with {done.returncode}")
                result = json.loads(out.read_text())[0]
                results.setdefault(i, {**result, "ms_per_step": []})["ms_per_step"] += result["ms_per_step"]
    return [results[i] for i in range(len(args.code))]


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--code",
        nargs="+",
        type=Path,
        default=[ROOT],
        help="checkouts to measure (each its own "
        "train_emotion.py and facenets/), e.g. one made with git worktree add /tmp/old <commit>",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each checkout; the time is given as min-max")
    p.add_argument(
        "--width",
        type=int,
        default=FLAGS["width"],
        help="vgg's first-stage channels: tiny, so the host's work dominates",
    )
    p.add_argument("--batch-size", type=int, default=FLAGS["batch_size"], help="images per step")
    p.add_argument(
        "--synthetic-count",
        type=int,
        default=FLAGS["synthetic_count"],
        help="synthetic faces, 80%% Training: 1120 make 56 steps of 16 per epoch, as FER2013 at batch 512",
    )
    p.add_argument("--epochs", type=int, default=FLAGS["epochs"], help="epochs of each run")
    # One thread: the host's part is one Python thread anyway, and on a busy machine several threads make every small
    # operation wait for the slowest of them (measured on 2 shared cores: 15-22 ms per step with 1, 260-440 with 2).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--small",
        action="store_true",
        help="CI smoke run; flags given explicitly still win. Sets "
        + ", ".join(f"--{k} {v}" for k, v in SMALL.items()),
    )
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "extra",
        nargs="*",
        default=[],
        help="after --: train_emotion.py flags for every run, e.g. -- "
        "--ensemble 4 (they must exist in every checkout measured)",
    )
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.small:  # parse again with the small defaults, so that explicitly given flags still win
        p.set_defaults(**SMALL)
        args = p.parse_args(argv)
    if min(args.repeats, args.width, args.batch_size, args.epochs, args.threads) < 1:
        p.error("--repeats, --width, --batch-size, --epochs and --threads must be positive")
    args.code = [code.resolve() for code in args.code]
    results = [measure(args.code[0], args)] if len(args.code) == 1 else measure_apart(args)
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads; {args.repeats} timed runs of each checkout of "
        f"train_emotion.py {' '.join([*shape_flags(args), *args.extra])}\n"
    )
    print(f"{'commit':22s} {'ms per step (min-max)':>22s} {'syncs per step':>15s} {'ops per step':>13s}  code")
    for r in results:
        ms = r["ms_per_step"]
        print(
            f"{r['commit']:22s} {f'{min(ms):.2f}-{max(ms):.2f}':>22s} {r['syncs_per_step']:15.3f} "
            f"{r['ops_per_step']:13.1f}  {r['code']}"
        )
    for r in results:
        print(
            f"\nsyncs of {r['commit']} over {r['steps']} steps: "
            + (", ".join(f"{where} x{n}" for where, n in r["syncs"].items()) or "none")
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
