"""Run keeping: one run from start to finish (Run), its folder, checkpoints, the csv log and result files, Ctrl-C, and
one-line errors for flags.

    run = runs.Run(args, command, device, "train_x.py", needs=RESUME_KEYS, not_saved=NOT_SAVED)
    cfg = run.cfg                                   # the settings: the flags, or a resumed run's saved ones
    batch_size, steps = run.batching(len(x_train))
    run.start("vgg-20261204", {"model": model, "optimizer": optimizer, "scheduler": None}, data=x_train)
    for epoch in run.epochs():                      # Ctrl-C / SIGTERM: the step ends, last.pt is saved, status 130
        sums = run.epoch_sums(loss=())              # on the device; a resumed epoch's so far
        for step, idx in run.batches():             # this epoch's seeded order, from where a resumed run stopped
            ...                                     # the script's own step
        run.end_epoch(row, score=val_acc)           # the log, best.pt and (every SAVE_EVERY seconds) last.pt
    best = run.best_weights(model=model)
    run.finish(results)                             # metrics.json

Every file is written to a temporary name beside its target and then renamed, so a crash, kill -9 or Ctrl-C
in the middle of a write leaves the previous version intact, never half a file; a write that fails (full disk,
read-only folder) says which file in one line and leaves the previous version as it was.
Checkpoints are plain dicts of tensors, numbers and strings, loaded with weights_only=True: loading a checkpoint
never runs code from it. A checkpoint that loads but does not fit (another network, another class count, a key
missing) is one line too, never a traceback: see load_checkpoint and loading.
"""

import argparse
import ast
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import warnings
import zlib
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


class RunError(Exception):
    """A run setting, folder or checkpoint the user can fix; str(e) is one line saying what to do."""


class Stopped(Exception):
    """A run stopped by Ctrl-C or SIGTERM after saving where it was; str(e) says where and how to go on."""


class Diverged(Exception):
    """A run whose losses or weights are no longer finite, stopped without saving them; str(e) says what it kept."""


STOPPED, DIVERGED = 130, 3  # exit statuses


def first_line(error: BaseException, width: int = 160) -> str:
    """The gist of an exception's message in one short line (torch's run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Error(s) in loading state_dict for X:" is only a heading
        lines = lines[1:]
    return textwrap.shorten(lines[0], width, placeholder="...") if lines else type(error).__name__


# ---------------------------------------------------------------- writing


def _write_failed(path: Path, error: OSError) -> RunError:
    if error.errno == 28 or (path.parent.is_dir() and shutil.disk_usage(path.parent).free < (64 << 20)):
        reason = "the disk is full"
    elif error.strerror:
        reason = error.strerror
    elif path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        reason = "the folder is read-only"
    else:
        reason = first_line(error, 100)
    return RunError(
        f"could not write {path} ({reason}): free some space or make {path.parent} writable; "
        f"the previous {path.name}, if any, is unchanged"
    )


def make_folder(path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only parent
        raise RunError(f"cannot make the folder {path} ({e.strerror or e}): choose another place") from None
    return path


def replace_atomically(path, write):
    """Call write(tmp_path), then rename tmp_path over path; a failed write raises RunError and keeps path as it was."""
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj):
    return replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path, what: str, fix: str) -> dict:
    """The JSON object in path, which must be `what`; else RunError saying `fix`, the thing to do."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise RunError(f"{path} cannot be read ({first_line(e, 80)}): {fix}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path} is not {what}: {fix}")
    return obj


def save_checkpoint(path, state: dict):
    # Serialised in memory first, then written as plain bytes: torch's zip writer turns a full disk into
    # "RuntimeError: unexpected pos", a plain write into OSError "No space left on device", which names the file.
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())

    return replace_atomically(path, write)


def write_log(path, history: list[dict]):
    """Rewrite the whole csv log from history, so a resumed run never holds rows twice."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    return replace_atomically(path, write)


# ---------------------------------------------------------------- reading checkpoints


def load_checkpoint(path, map_location="cpu", needs=("model", "config")) -> dict:
    """A checkpoint dict holding every key in needs; a run folder stands for its best.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise RunError(f"{path} is a folder without a best.pt: pass a best.pt or last.pt from a run folder")
        path = path / "best.pt"
    if not path.is_file():
        raise RunError(f"checkpoint {path} not found: pass a best.pt or last.pt from a run folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip, or a pickle in the legacy format
        raise RunError(f"{path} is not a PyTorch checkpoint file: pass a best.pt or last.pt from a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        # torch's own message can run to a paragraph (weights_only advice): its first sentence is enough here
        reason = first_line(e).split(". ")[0].rstrip(".")
        raise RunError(
            f"checkpoint {path} could not be read ({reason}): it is not a facenets checkpoint or it is damaged"
        ) from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():  # e.g. a bare state_dict from elsewhere
        raise RunError(
            f"{path} is not a facenets checkpoint (it has no model and config): pass a best.pt or last.pt "
            "from a run folder"
        )
    missing = [key for key in needs if key not in state]
    if missing:
        raise RunError(
            f"{path} lacks {missing[0]!r}: it was saved by another script or an older version of this "
            "one; use a checkpoint of this script, or train again"
        )
    return state


@contextmanager
def loading(path, what: str):
    """Turn a part of checkpoint path that does not fit (shapes, keys, types) into one RunError naming `what`.

    with runs.loading(path, "weights"):
        model.load_state_dict(ckpt["model"])
    """
    try:
        yield
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise RunError(
            f"{path} does not fit this run: its {what} cannot be loaded ({first_line(e, 120)}); "
            "use a checkpoint of the same model and data"
        ) from None


# ---------------------------------------------------------------- run folders

# What a run writes before anything worth keeping: a folder holding only these was stranded at its start.
STARTING_FILES = ("config.json",)


def _holds_results(path: Path) -> bool:
    return any(not p.name.endswith(".tmp") and p.name not in STARTING_FILES for p in path.iterdir())


def run_dir(root, name) -> Path:
    """runs/<task>/<name>/ for a new run: it must not overwrite an old one.

    A folder holding nothing but a config.json (a run stopped before its first save) or leftover temporary files is
    taken over: nothing in it is worth keeping.
    """
    path = Path(root) / name
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} is a file, not a run folder: pick another --out or --name")
    if path.is_dir() and _holds_results(path):
        hint = f"add --resume {path} to continue it, or " if (path / "last.pt").is_file() else ""
        raise RunError(f"run folder {path} already holds a run: {hint}pick another --name")
    return make_folder(path)


def existing_run(path) -> Path:
    """The run folder --resume names (the folder, or its last.pt); it has a last.pt or at least its config.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        path = path.parent
    if not path.is_dir():
        raise RunError(f"cannot resume: {path} is not a run folder")
    if not (path / "last.pt").is_file() and not (path / "config.json").is_file():
        raise RunError(f"cannot resume: {path} holds neither last.pt nor config.json, so it is not a run folder")
    return path


# ---------------------------------------------------------------- resuming


def resumed_config(
    run: Path, cfg: dict, ckpt, args, device: torch.device, not_saved=(), script="this script", added=None
) -> dict:
    """The settings a resumed run goes on with: its saved cfg (so it stays the same experiment), a typed --epochs aside.

    ckpt is None for a run stopped before its first save (it starts again from its config.json); args.given holds the
    flags typed (given_flags). RunError for what cannot go on: another kind of device than the one its random states
    belong to, a setting typed (silently ignoring it would leave the user believing it took effect), a finished run,
    a new length for a schedule laid out for the old one, a config from an older version of the script. added maps a
    setting newer than some saved runs to a function of their cfg giving the value they ran with, so they go on.
    """
    trained_on = "cpu" if ckpt is None or ckpt["rng"]["cuda"] is None else "cuda"
    if ckpt is not None and trained_on != device.type:
        raise RunError(
            f"{run} was trained on {trained_on}, this run is on {device.type}: resume it with --device {trained_on}"
        )
    for name, value_in in (added or {}).items():
        cfg.setdefault(name, value_in(cfg))
    missing = sorted(set(vars(args)) - set(cfg) - set(not_saved))
    if missing:
        raise RunError(f"{run} was saved by an older {script} (it lacks {missing[0]!r}): start a new run")
    typed = [flag for dest, flag in args.given.items() if dest not in ("resume", "epochs", "device")]
    if typed:
        raise RunError(
            f"--resume goes on with the saved settings of {run}: drop {typed[0]} "
            "(only --epochs and --device may be given)"
        )
    done = len(ckpt["history"]) if ckpt else 0
    longer = "epochs" in args.given and args.epochs > done
    budget = cfg.get("time_budget")
    if budget and ckpt and sum(h["seconds"] for h in ckpt["history"]) >= budget * 60:
        raise RunError(
            f"{run} has spent its --time-budget of {budget:g} minutes ({done} epochs): nothing to resume; "
            "start a new run with a larger --time-budget"
        )
    if (run / "metrics.json").is_file() and not longer:
        raise RunError(
            f"{run} has finished ({done} epochs; its results are in metrics.json): nothing to resume; "
            f"--epochs above {done} trains it on (none and plateau schedules), or start a new run"
        )
    if "epochs" in args.given and args.epochs != cfg["epochs"]:
        if cfg.get("scheduler") in ("onecycle", "cosine"):
            raise RunError(
                f"--epochs cannot change on resume: the {cfg['scheduler']} schedule of {run} was laid out "
                f"for {cfg['epochs']} epochs"
            )
        cfg["epochs"] = args.epochs
    return cfg


# Flags that are not settings of a run (what to do, not how to train, or folded into model_options): not saved.
NOT_SETTINGS = ("predict", "checkpoint", "resume", "given", "model_opt", "width")
# What every checkpoint holds to go on exactly where it was saved; a script adds its own (its labels, its best score).
TRAINING_STATE = ("model", "config", "ema", "optimizer", "scheduler", "epoch", "step", "order", "history", "rng")


def settings(
    args, command: str, device: torch.device, needs, not_saved, script: str, added=None
) -> tuple[Path | None, dict | None, dict]:
    """What a run goes on with: (its folder, its last.pt, its settings) under --resume, else (None, None, the flags).

    A new run's settings are the flags but not_saved, and the command; a resumed one's come from resumed_config, its
    checkpoint being None when it was stopped before its first save (it starts again from its config.json); added:
    resumed_config's.
    """
    if not args.resume:
        return None, None, {**{k: v for k, v in vars(args).items() if k not in not_saved}, "command": command}
    run = existing_run(args.resume)
    if (run / "last.pt").is_file():
        ckpt = load_checkpoint(run / "last.pt", needs=needs)
        return run, ckpt, resumed_config(run, ckpt["config"], ckpt, args, device, not_saved, script, added)
    saved = read_json(run / "config.json", "a run's config", "start a new run")
    print(f"{run} was stopped before its first save: starting it again from epoch 1")
    return run, None, resumed_config(run, saved, None, args, device, not_saved, script, added)


# ---------------------------------------------------------------- one run, start to finish

SAVE_EVERY = 30  # seconds of training a kill -9 may cost at most: last.pt is rewritten this often, mid-epoch too
SHOW_EVERY = 20  # steps between looks at the running sums for the progress bar: each look waits for the GPU
# Under torchrun, seconds a process waits for the others before it stops with an error. Processes wait for process
# 0 while it validates and writes files (seconds); a process that died is noticed at once or by torchrun.
PEER_TIMEOUT = 60


def torchrun_world_size() -> int:
    """How many processes train the run: torchrun's WORLD_SIZE, 1 for a plain python run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class StopRequests:
    """Ctrl-C or SIGTERM (a cluster taking the machine back) inside the block only sets .asked: the loop finishes its
    step, saves and stops, since a step cut in half would leave the weights half-updated. A second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.asked = False
        self._previous = {sig: signal.signal(sig, self._ask) for sig in self.SIGNALS}
        return self

    def _ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def data_fingerprint(images: torch.Tensor) -> dict:
    """The count and a checksum of up to 1,000 evenly spaced images: a resumed run must train on the same data."""
    sample = images[:: max(1, len(images) // 1000)].cpu().contiguous()
    return {"images": len(images), "crc32": zlib.crc32(sample.numpy().tobytes())}


class Run:
    """One training run from start to finish: its settings, its folder, where it is, its checkpoints and its end.

    A new run takes its settings from the flags; --resume takes the saved ones and goes on exactly where last.pt was
    written, mid-epoch too: the epoch's batch order, its running sums and every random state are in the checkpoint.
    The loops stay in the scripts; a Run is what they iterate over (epochs, batches) and report to (end_epoch).
    Stopping is an exception the script's main turns into its exit status (one_line_errors): Stopped (130) after
    Ctrl-C or SIGTERM, with last.pt saved; Diverged (3) when the losses or weights are no longer finite, with the
    last good last.pt and best.pt kept.
    """

    def __init__(
        self,
        args,
        command: str,
        device: torch.device,
        needs,
        not_saved,
        best: str = "best_score",
        lower_is_better: bool = False,
        advice: str = "a lower --lr or another --seed",
        added: dict | None = None,
    ):
        self.world_size, self.rank = torchrun_world_size(), int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        if self.world_size > 1:
            device = self._join_torchrun(device)
        self.device, self.needs, self.advice = device, needs, advice
        if "sync_bn" in vars(args):  # runs saved before --sync-bn trained without it
            added = {"sync_bn": lambda old: False, **(added or {})}
        self.folder, self._ckpt, self.cfg = settings(args, command, device, needs, not_saved, command.split()[0], added)
        if self.world_size > 1 and self.cfg.get("ensemble", 1) > 1:
            raise RunError(
                "--ensemble is not supported under torchrun (its members already train side by side in one "
                "process): run it with python, not torchrun"
            )
        torch.manual_seed(self.cfg["seed"])  # the weights; the batch order and augmentation draw from .generator
        self.t0, self.resuming = time.perf_counter(), bool(args.resume)
        self._new_folder = None if args.resume else (args.out, args.name)
        # a dry run checks the pipeline, it is not a run to keep: its folder is temporary unless --out is given
        self._dry_run_only = self.cfg["dry_run"] and not args.resume and "out" not in args.given
        self._temporary = None
        ckpt = self._ckpt or {}
        self.resumed_with = ckpt.get("resumed_with", []) + [command] if args.resume else []
        self.earlier_wall = ckpt.get("wall_seconds", 0.0)
        self.history = ckpt.get("history", [])
        self.best_key, self.lower_is_better = best, lower_is_better
        self.best = ckpt.get(best, math.inf if lower_is_better else -math.inf)
        if self.best == -1.0:  # train_emotion's "no validation score yet" before 2026-12-04
            self.best = -math.inf
        self.epoch, self.first_step = ckpt.get("epoch", 0), ckpt.get("step", 0)
        self.last_epoch = 1 if self.cfg["dry_run"] else self.cfg["epochs"]
        self.train_seconds = sum(h["seconds"] for h in self.history)
        self.budget = self.cfg["time_budget"] * 60 if self.cfg.get("time_budget") else math.inf
        self.generator = torch.Generator(device).manual_seed(self.cfg["seed"])  # batch order and augmentation
        # Under torchrun every process draws the same batch order from .generator, and its augmentation from a
        # generator of its own; one process draws both from .generator, as it always did.
        self.augment_generator = self.generator
        if self.world_size > 1:
            self.augment_generator = torch.Generator(device).manual_seed(self.cfg["seed"] + 1000 * (self.rank + 1))
        self.order, self.sums, self._stop, self._over = None, {}, None, False

    def _join_torchrun(self, device: torch.device) -> torch.device:
        """Join the processes torchrun started (NCCL between GPUs, gloo between CPUs): the device this one trains on.
        one_line_errors leaves the group at the end."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # A process that waits longer than this for the others stops with an error, rather than hang forever
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=PEER_TIMEOUT))
        if not self.is_main:  # process 0 alone prints the run's lines and bars; errors still come from every process
            sys.stdout = open(os.devnull, "w")
        return device

    def _from_main(self, obj):
        """Process 0's obj in every process (one process: obj)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, compute):
        """compute() run by process 0 alone, its result given to every process: an evaluation done once."""
        return self._from_main(compute() if self.is_main else None)

    def _agree(self, *flags) -> list[bool]:
        """Each flag true in every process where it is true in any: all processes save, stop and end together."""
        if self.world_size == 1:
            return list(flags)
        anywhere = torch.tensor(flags, dtype=torch.int32, device=self.device)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in anywhere.tolist()]

    def _summed(self, sums: dict) -> dict:
        """The sums of all processes (one process: its own)."""
        return {key: self.reduced(value) for key, value in sums.items()}

    def reduced(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """tensor summed (or op) over all processes (one process: tensor itself)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=op)
        return tensor

    def average_gradients(self, module: torch.nn.Module):
        """Under torchrun, every process's gradients of module averaged in place, as DistributedDataParallel does
        in backward: for a step that calls a module several times, or freezes it in between (a GAN's D)."""
        if self.world_size > 1:
            for parameter in module.parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.world_size

    def parallel(self, model: torch.nn.Module, sync_bn: bool = False) -> torch.nn.Module:
        """The model as a step trains it: under torchrun wrapped in DistributedDataParallel, which averages every
        process's gradients in backward (sync_bn: BatchNorm statistics over the global batch); else model itself.
        Evaluate and save model, not this wrapper."""
        if self.world_size == 1:
            return model
        if sync_bn:  # in place: the new layers share the old ones' parameters and buffers, so optimizers still fit
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def saved(self, key: str, default):
        """What the checkpoint being resumed holds under key (a script's own state), else default."""
        return self._ckpt[key] if self._ckpt else default

    def batching(self, train_size: int) -> tuple[int, int]:
        """(batch size, steps per epoch) for train_size images: --batch-size at most, the ragged last batch dropped
        (each epoch is reshuffled), two steps for --dry-run."""
        if train_size < 1:
            raise RunError(f"{self.cfg['data']} leaves no images to train on: use more images")
        self.train_size = train_size
        self.batch_size = min(self.cfg["batch_size"], train_size)
        if self.batch_size % self.world_size:
            raise RunError(
                f"--batch-size {self.batch_size} does not split over {self.world_size} processes: "
                f"give a multiple of {self.world_size} (it is the global batch; each process takes its share)"
            )
        self.shard = self.batch_size // self.world_size  # this process's share of each batch
        self.steps = min(train_size // self.batch_size, 2 if self.cfg["dry_run"] else train_size)
        total = self.steps * self.cfg["epochs"]  # what a schedule is laid out for (a dry run stops after 2 steps)
        if self.cfg.get("scheduler") == "onecycle" and total < 3:  # its two phases need a step each and a last one
            raise RunError(
                f"--scheduler onecycle needs at least 3 steps and this run has {total}: use more --epochs, "
                "a smaller --batch-size, or --scheduler none"
            )
        return self.batch_size, self.steps

    def start(
        self, name: str, parts: dict, data: torch.Tensor, check: dict | None = None, keep: dict | None = None, plot=None
    ):
        """Make the run folder (a new run) or load the checkpoint into parts (a resumed one), then write config.json.

        parts: what every checkpoint holds the state_dict of, by name (networks, optimizers, a scheduler; None for
        none). data: the training images, checked to be the same on resume. check: what a resumed run must share with
        its checkpoint (its classes, its heads); keep: the script's own state saved with each checkpoint (read back
        with .saved). plot: draws the run's curves from .history whenever the log is written.
        """
        self.parts, self.check, self.keep, self.plot = parts, check or {}, keep or {}, plot or (lambda: None)
        self.data = data_fingerprint(data)
        if self._new_folder:
            folder, error = None, None
            if self.is_main:  # which decides the folder (its name may hold the time) and alone writes into it
                try:
                    folder = self._make_folder(name)
                except RunError as e:
                    error = str(e)
            folder, error = self._from_main((folder, error))
            if error:
                raise RunError(error)
            self.folder = folder
        elif self._ckpt:
            self._load(self.folder / "last.pt", self._ckpt)
            print(f"resuming {self.folder} at epoch {self.epoch + 1}, step {self.first_step + 1}")
        if self.is_main:
            write_json(self.folder / "config.json", self.cfg)
        self._saved_at = time.perf_counter()  # the first last.pt comes SAVE_EVERY seconds into training

    def _make_folder(self, name: str) -> Path:
        out, name = self._new_folder[0], self._new_folder[1] or name
        if self._dry_run_only:
            self._temporary = tempfile.TemporaryDirectory(prefix="facenets-dry-run-")
            out = self._temporary.name
            print("dry run: its run folder is temporary and removed at the end (give --out to keep it)")
        folder = run_dir(out, name)
        print(f"run folder: {folder}")
        return folder

    def _load(self, path: Path, ckpt: dict):
        for key, value in self.check.items():
            if ckpt[key] != value:
                raise RunError(
                    f"{self.folder} was trained on other {key} than {self.cfg['data']} and these flags give "
                    "now: start a new run"
                )
        changed = ckpt.get("data", self.data) != self.data  # checkpoints from before the fingerprint: the order's size
        if changed or (ckpt["step"] and len(ckpt["order"]) != self.train_size):
            raise RunError(
                f"{self.folder} was trained on other data than {self.cfg['data']} holds now: start a new run"
            )
        with loading(path, "weights"):
            for key, part in self.parts.items():
                if isinstance(part, torch.nn.Module):
                    part.load_state_dict(ckpt[key])
        with loading(path, "optimizer state"):
            for key, part in self.parts.items():
                if part is not None and not isinstance(part, torch.nn.Module):
                    part.load_state_dict(ckpt[key])
        with loading(path, "random state"):
            self.generator.set_state(ckpt["rng"]["loop"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:  # dropout on the GPU draws from it
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            saved_with = ckpt.get("world_size", 1)  # checkpoints from before torchrun: one process
            if self.world_size > 1 and saved_with == self.world_size:
                self.augment_generator.set_state(ckpt["rng"]["augment"][self.rank])
            elif saved_with != self.world_size:  # the order, schedule and sums are global: only augmentation differs
                print(
                    f"{self.folder} was trained by {saved_with} process(es), now by {self.world_size}: it goes on "
                    "with the same batches and schedule, but with other augmentation draws than it would have had"
                )
        if ckpt["step"]:
            self.order = ckpt["order"].to(self.device)

    # ------------------------------------------------------------ the loop

    def epochs(self):
        """The epochs left to train, 0-based; Ctrl-C and SIGTERM inside only ask the run to stop at the next save."""
        with StopRequests() as self._stop:
            while self.epoch < self.last_epoch and not self._over and self.train_seconds < self.budget:
                yield self.epoch
                self.epoch += 1

    def epoch_sums(self, **shapes) -> dict:
        """Zero tensors of these shapes on the device, for the loop to sum its losses into without waiting for the
        GPU; a resumed epoch's hold its sums so far. Saved with every mid-epoch checkpoint."""
        saved = self._ckpt["sums"] if self.first_step and self.is_main else {}  # process 0 holds the global sums
        self.sums = {
            key: torch.tensor(saved[key], device=self.device)
            if key in saved
            else torch.zeros(shape, device=self.device)
            for key, shape in shapes.items()
        }
        return self.sums

    def batches(self, members: int = 1, show: tuple = ()):
        """(step, indices) for each step of this epoch: a seeded permutation of the training set ([B, members]: each
        member of an ensemble its own order), from a resumed run's step on. Between steps: last.pt every SAVE_EVERY
        seconds with the exact position, and the stop a Ctrl-C asked for. show: sums to show in the progress bar,
        per image."""
        if not self.first_step:
            orders = [
                torch.randperm(self.train_size, device=self.device, generator=self.generator) for _ in range(members)
            ]
            self.order = orders[0] if members == 1 else torch.stack(orders, 1)
        started = time.perf_counter() - (self._ckpt["sums"]["seconds"] if self.first_step else 0.0)
        bar = tqdm(
            range(self.first_step, self.steps),
            desc=f"epoch {self.epoch + 1}/{self.last_epoch}",
            leave=False,
            file=sys.stdout,
            disable=None,
        )  # no bar when the output is a file: its updates would fill it
        self.steps_done = self.steps
        mine = slice(self.rank * self.shard, (self.rank + 1) * self.shard)  # this process's share of each batch
        for step in bar:
            batch = self.order[step * self.batch_size : (step + 1) * self.batch_size]
            yield step, batch if self.world_size == 1 else batch[mine]
            if (step - self.first_step) % SHOW_EVERY == SHOW_EVERY - 1 and not bar.disable:
                seen = (step + 1) * self.shard  # this process's sums are over its share of the images
                means = (torch.stack([self.sums[key] for key in show]) / seen).tolist() if show else []  # one sync
                bar.set_postfix(
                    {key: f"{mean:.3f}" for key, mean in zip(show, means)},
                    img_s=f"{(step + 1) * self.batch_size / (time.perf_counter() - started):.0f}",
                )
            if self.world_size > 1 and (step - self.first_step) % SHOW_EVERY != SHOW_EVERY - 1:
                continue  # processes agree on stopping and saving every SHOW_EVERY steps: each look waits for all
            out_of_time, due, self._stop.asked = self._agree(
                self.train_seconds + time.perf_counter() - started >= self.budget,
                step + 1 < self.steps and self._due(),
                self._stop.asked,
            )
            if out_of_time:  # the rest is not trained on
                self.steps_done, self.last_epoch = step + 1, self.epoch + 1
                break
            if due:  # inside an epoch: its exact position
                sums = {key: value.tolist() for key, value in self._summed(self.sums).items()}
                self._save("last.pt", self.epoch, step + 1, {**sums, "seconds": time.perf_counter() - started})
                if self._stop.asked:
                    raise Stopped(self._stopped(f"in epoch {self.epoch + 1} after step {step + 1}"))
        if self.device.type == "cuda":  # the epoch's time is the GPU's, not the time to queue its work
            torch.cuda.synchronize(self.device)
        self.seconds, self.first_step = time.perf_counter() - started, 0
        if self.world_size > 1:  # the epoch's sums and time over all processes, so that all log and end alike
            self.sums.update(self._summed(self.sums))
            self.seconds = self.on_main(lambda: self.seconds)
        self.train_seconds += self.seconds

    def is_last_epoch(self) -> bool:
        return self.epoch + 1 == self.last_epoch

    def end_epoch(self, row: dict, score: float | None = None, last: bool = False):
        """Log the epoch's row; save best.pt when score beats the best so far, and the log, the plot and last.pt at
        the end or every SAVE_EVERY seconds (~0.1 s each: a tenth of a short GPU epoch). last: stop after this one."""
        losses = [value for key, value in row.items() if "loss" in key and isinstance(value, float)]
        if not all(map(math.isfinite, losses)):
            self.diverged("the losses are NaN or infinite", f"in epoch {self.epoch + 1}")
        self.history.append(row)
        if score is not None and (score < self.best if self.lower_is_better else score > self.best):
            self.best = score  # before last.pt, so that a resumed run knows this best
            self._save("best.pt", self.epoch + 1)
        self._over = last or self.is_last_epoch()
        due, self._stop.asked = self._agree(self._due(), self._stop.asked)
        if self._over or due:
            if self.is_main:
                write_log(self.folder / "log.csv", self.history)
                self.plot()
            self._save("last.pt", self.epoch + 1)
        if self._stop.asked:
            raise Stopped(self._stopped(f"after epoch {self.epoch + 1}"))

    def diverged(self, why: str, where: str):
        """Stop without saving the broken state: last.pt and best.pt stay the last good ones."""
        warnings.warn(f"training diverged {where}: {why}")
        if self.history and self.is_main:  # none in the first epoch: nothing to log or plot, and the folder stays
            write_log(self.folder / "log.csv", self.history)  # one the same command takes over
            self.plot()
        kept = " and ".join(name for name in ("last.pt", "best.pt") if (self.folder / name).is_file())
        raise Diverged(
            f"stopped: {self.folder} keeps {kept or 'no checkpoint (none was saved yet)'}; start a new run "
            f"with {self.advice}"
        )

    # ------------------------------------------------------------ checkpoints

    def _due(self) -> bool:
        return self._stop.asked or time.perf_counter() - self._saved_at > SAVE_EVERY

    def _save(self, name: str, epoch: int, step: int = 0, sums: dict | None = None):
        """Everything needed to go on exactly from here, after `step` steps of epoch `epoch` (0-based), as name."""
        weights = [p for part in self.parts.values() if isinstance(part, torch.nn.Module) for p in part.parameters()]
        if not torch.stack([p.isfinite().all() for p in weights]).all():  # one wait for the device, not one a tensor
            self.diverged("the weights are NaN or infinite", f"in epoch {epoch + 1}")
        state = {key: None if part is None else part.state_dict() for key, part in self.parts.items()}
        state.update(
            {
                "epoch": epoch,
                "step": step,
                "order": self.order.cpu() if step else None,
                "sums": sums,
                self.best_key: self.best,
                "history": self.history,
                "config": self.cfg,
                **self.check,
                **{k: v.item() if torch.is_tensor(v) else v for k, v in self.keep.items()},
                "resumed_with": self.resumed_with,
                "wall_seconds": self.wall_seconds(),
                "data": self.data,
                "rng": {
                    "loop": self.generator.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                },
            }
        )
        if self.world_size > 1:  # every process's augmentation draws, so that a resumed run goes on with the same
            states = [None] * self.world_size
            dist.all_gather_object(states, self.augment_generator.get_state())
            state["rng"]["augment"], state["world_size"] = states, self.world_size
        error = None
        if self.is_main:
            try:
                save_checkpoint(self.folder / name, state)
            except RunError as e:
                error = f"{e}; then --resume {self.folder} goes on from its last save"
        error = self._from_main(error)  # a failed save stops every process, not process 0 alone
        if error:
            raise RunError(error)
        if name == "last.pt":  # the one a resumed run starts from: its age is what a kill would cost
            self._saved_at = time.perf_counter()

    def _stopped(self, where: str) -> str:
        return f"\nstopped {where}: saved {self.folder / 'last.pt'}; continue with --resume {self.folder}"

    def wall_seconds(self) -> float:
        return self.earlier_wall + time.perf_counter() - self.t0

    # ------------------------------------------------------------ the end

    def best_weights(self, **networks) -> dict:
        """Load the chosen epoch's weights into networks (by checkpoint key; None for none) and return its checkpoint:
        best.pt, or, where no score chose one, the last epoch (nothing may peek at the test set to choose)."""
        if not math.isfinite(self.best):
            replace_atomically(self.folder / "best.pt", lambda tmp: shutil.copyfile(self.folder / "last.pt", tmp))
        best = load_checkpoint(self.folder / "best.pt", map_location=self.device, needs=self.needs)
        with loading(self.folder / "best.pt", "weights"):
            for key, network in networks.items():
                if network is not None:
                    network.load_state_dict(best[key])
        return best

    def finish(self, results: dict) -> dict:
        """results with what every run reports (epochs, times, device, the commands), written as metrics.json."""
        started_with = {
            "command": self.cfg["command"],
            **({"resumed_with": self.resumed_with} if self.resumed_with else {}),
        }
        results = {
            **results,
            "epochs_run": len(self.history),
            "train_seconds": round(self.train_seconds, 1),
            "wall_seconds": round(self.wall_seconds(), 1),
            "device": device_name(self.device),
            **started_with,
        }
        write_json(self.folder / "metrics.json", results)
        if self._temporary:
            self._temporary.cleanup()
        return results


# ---------------------------------------------------------------- a script's main


def one_line_errors(body, *errors) -> int:
    """body()'s exit status; what a user can fix (RunError, `errors`, a file that cannot be written) and Ctrl-C
    become one line on stderr and status 2 or 130, never a traceback. Warnings print as one line each too."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    # SIGTERM as Ctrl-C from here on: one line and status 130 wherever it comes, while images decode too
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return body()
    except Stopped as e:  # saved first
        print(e)
        return STOPPED
    except Diverged as e:
        print(e)
        return DIVERGED
    except (RunError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: another process stopped, or none answered within PEER_TIMEOUT
        # NCCL's errors are DistErrors; gloo's plain RuntimeErrors, which name gloo's source
        if not (isinstance(e, dist.DistError) or (dist.is_initialized() and "gloo" in str(e))):
            raise
        print(
            f"error: another process of this torchrun run stopped or stopped answering ({first_line(e, 100)}): "
            "the run folder's last.pt, if any, is whole; go on with --resume <its run folder>",
            file=sys.stderr,
        )
        return 2
    except OSError as e:  # a file read or written outside this module's writer, e.g. a plot or an annotated photo
        fix = {28: "free some space", 13: "check its permissions", 1: "check its permissions"}.get(e.errno, "check it")
        print(f"error: could not read or write {e.filename} ({e.strerror or e}): {fix}", file=sys.stderr)
        return 2
    except MemoryError as e:  # what check_memory foresaw, or what it did not
        print(f"error: {e or 'out of memory: choose smaller sizes or fewer images'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (those save and stop by themselves)
        print(
            "\nstopped (Ctrl-C): nothing half-written is kept; a started run goes on with --resume <its run folder>",
            file=sys.stderr,
        )
        return STOPPED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist.is_available() and dist.is_initialized():  # torchrun's processes: leave the group
            dist.destroy_process_group()


# ---------------------------------------------------------------- flags


class FlagParser(argparse.ArgumentParser):
    """argparse that answers a wrong flag in one line (the usage of a script with 40 flags runs to 24), describes the
    script by the first paragraph of its docstring, and shows every flag's default in --help."""

    def __init__(self, docstring: str = "", **kwargs):
        super().__init__(
            description=docstring.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs
        )

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def add_run_flags(parser: argparse.ArgumentParser, out: str, task: str | None) -> argparse._ArgumentGroup:
    """The "run" and "inference" flag groups every script has; check_run_flags checks them.

    task: what --predict prints for each face; None for a generator, whose inference is --sample N instead (N
    generated images written as PNG files).
    """
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: the GPU when there is one")
    g.add_argument(
        "--cache", default=None, help="folder for decoded data sets; None: $FACENETS_CACHE or ~/.cache/facenets"
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast on a GPU, fp32 on a CPU; bf16 also pays on CPUs with bf16 instructions (a run "
        "in fp32 on one starts with a hint): Intel's AMX, 2.8x the images/s of fp32 on 2 cores, AMD Zen 4's AVX-512 "
        "BF16, 1.6-1.7x; CPUs with neither run it slower than fp32",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model; on a GPU also with CUDA graphs: 1.6x the "
        "images/s at batch 512 on an H100, after ~15 s of compiling",
    )
    inference = "--predict" if task else "--sample"
    written = "the annotated copies (default: predictions/" if task else "the PNG files (default: samples/"
    g.add_argument(
        "--out",
        default=out,
        help=f"parent folder of run folders; with {inference}, the folder for {written} beside the checkpoint)",
    )
    g.add_argument("--name", default=None, help="run folder name (default: model and time)")
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR (or RUN_DIR/last.pt) from its "
        "last save, with its saved settings; --epochs may raise the total",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="one epoch of two batches and a short evaluation: checks the whole pipeline in seconds",
    )
    i = parser.add_argument_group("inference")
    if task:
        i.add_argument(
            "--predict",
            nargs="+",
            metavar="PHOTO",
            help=f"find the faces in these photos (MTCNN) and print each face's {task}",
        )
    else:
        i.add_argument(
            "--sample",
            type=int,
            metavar="N",
            default=None,
            help="write N generated images as PNG files into --out "
            "(to score them elsewhere, e.g. with pytorch-fid or torch-fidelity), then stop",
        )
    i.add_argument(
        "--checkpoint",
        default=None,
        help=f"with {inference}: the best.pt or last.pt to use (a run folder: its best.pt)",
    )
    return g


def parse_flags(parser: argparse.ArgumentParser, argv=None, presets: dict | None = None) -> argparse.Namespace:
    """The flags of argv (default sys.argv[1:]), checked by check_run_flags; with --preset NAME, on the defaults of
    presets[NAME] (the flags a report used), so that flags typed on the command line still win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if presets and getattr(args, "preset", None):
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    check_run_flags(parser, args, argv)
    return args


def check_run_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """parser.error (one line) for run flags that cannot work; sets args.given, the flags typed on the command line.

    Every number must be finite: float("nan") parses, and a NaN learning rate or weight decay trains silently to a
    chance-level result, which no flag here is meant to allow.
    """
    args.given = given_flags(parser, argv)
    for dest, value in vars(args).items():
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                parser.error(f"{args.given.get(dest, dest)} {number}: give a finite number")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    # A name is one folder under --out: "../x" or "/" would write a run outside it (or onto / itself)
    if args.name is not None and (args.name in ("", ".", "..") or Path(args.name).name != args.name):
        parser.error(f"--name {args.name!r}: give the run folder's own name, without '/' (--out says where it goes)")
    inference = "--predict" if "predict" in vars(args) else "--sample"
    if vars(args).get("predict", vars(args).get("sample")) is not None and not args.checkpoint:
        parser.error(f"{inference} needs --checkpoint {parser.get_default('out')}/<run>/best.pt")


def add_model_flags(group: argparse._ArgumentGroup, names, example: str):
    """--model (one of names), --width and --model-opt, which model_options turns into the model's keywords."""
    group.add_argument("--model", default="vgg", choices=names, metavar="NAME", help="architecture (list below)")
    group.add_argument("--width", type=int, default=None, help="channels of the first stage of --model vgg")
    group.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"any keyword of the model's constructor, e.g. {example}; repeatable",
    )


def model_options(args: argparse.Namespace, **more) -> dict:
    """The keywords of the model's constructor that --model-opt, --width and more (those not None or False) give;
    ValueError for an item that is not KEY=VALUE."""
    options = key_values(args.model_opt, "--model-opt")  # a bare word such as downsample=stride too
    return options | {key: value for key, value in {"width": args.width, **more}.items() if value not in (None, False)}


def key_values(items: list[str], flag: str) -> dict:
    """{"width": 16, "hidden": (64, 32), "downsample": "stride"} from
    ["width=16", "hidden=(64, 32)", "downsample=stride"].

    Values are Python literals where they parse as one, else the bare word; an item without = is a ValueError.
    """
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def predictions_folder(args, name: str = "predictions") -> Path:
    """Where --predict (or --sample) writes its files: --out when typed, else the folder name beside the checkpoint."""
    checkpoint = Path(args.checkpoint)
    folder = (
        Path(args.out) if "out" in args.given else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / name
    )
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder} is a file: give a folder for the files of {name}")
    return folder


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """{dest: flag} for each flag typed on the command line argv, whatever its value (defaults are not typed)."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        typed = vars(parser.parse_known_args(argv)[0])
    finally:
        for action, default in defaults.items():
            action.default = default
    flags = {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}
    return {dest: flags.get(dest, dest) for dest in typed}
