"""Run keeping: the run folder, checkpoints, the csv log and result files, and one-line errors for flags.

Every file is written to a temporary name beside its target and then renamed, so a crash, kill -9 or Ctrl-C
in the middle of a write leaves the previous version intact, never half a file; a write that fails (full disk,
read-only folder) says which file in one line and leaves the previous version as it was.
Checkpoints are plain dicts of tensors, numbers and strings, loaded with weights_only=True: loading a checkpoint
never runs code from it. A checkpoint that loads but does not fit (another network, another class count, a key
missing) is one line too, never a traceback: see load_checkpoint and restoring.
"""
import argparse
import ast
import csv
import json
import os
import shutil
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch


class RunError(Exception):
    """A run setting, folder or checkpoint the user can fix; str(e) is one line saying what to do."""


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
    return RunError(f"could not write {path} ({reason}): free some space or make {path.parent} writable; "
                    f"the previous {path.name}, if any, is unchanged")


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
    def write(tmp):
        # Through a Python file, so that a full disk is OSError "No space left on device", not torch's "unexpected pos"
        with open(tmp, "wb") as f:
            torch.save(state, f)
    return replace_atomically(path, write)


SAVE_EVERY = 30  # seconds of training a kill -9 may cost at most: last.pt is rewritten this often, mid-epoch too


class Saver:
    """Checkpoints of one run folder, and when the next is due: a kill -9 must never cost more than `every` seconds.

        saver = runs.Saver(run)
        if saver.due(stop.asked):         # a stop was asked, or last.pt is older than SAVE_EVERY seconds
            saver.save("last.pt", state)  # a failed write says how to go on: --resume from the last good save
    """

    def __init__(self, run: Path, every: float | None = None):
        self.run, self.every, self.saved_at = Path(run), SAVE_EVERY if every is None else every, time.perf_counter()

    def due(self, stop_asked: bool = False) -> bool:
        return stop_asked or time.perf_counter() - self.saved_at > self.every

    def save(self, name: str, state: dict) -> Path:
        try:
            path = save_checkpoint(self.run / name, state)
        except RunError as e:
            raise RunError(f"{e}; then --resume {self.run} goes on from its last save") from None
        if name == "last.pt":  # the one a resumed run starts from: its age is what a kill would cost
            self.saved_at = time.perf_counter()
        return path

    def stopped(self, where: str) -> int:
        """Say where a run stopped (after saving there) and how to go on; the exit status of a stopped run."""
        print(f"\nstopped {where}: saved {self.run / 'last.pt'}; continue with --resume {self.run}")
        return 130


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
        raise RunError(f"checkpoint {path} could not be read ({reason}): it is not a facenets checkpoint or "
                       "it is damaged") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():  # e.g. a bare state_dict from elsewhere
        raise RunError(f"{path} is not a facenets checkpoint (it has no model and config): pass a best.pt or last.pt "
                       "from a run folder")
    missing = [key for key in needs if key not in state]
    if missing:
        raise RunError(f"{path} lacks {missing[0]!r}: it was saved by another script or an older version of this "
                       "one; use a checkpoint of this script, or train again")
    return state


@contextmanager
def restoring(path, what: str):
    """Turn a part of checkpoint path that does not fit (shapes, keys, types) into one RunError naming `what`.

        with runs.restoring(path, "weights"):
            model.load_state_dict(ckpt["model"])
    """
    try:
        yield
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise RunError(f"{path} does not fit this run: its {what} cannot be loaded ({first_line(e, 120)}); "
                       "use a checkpoint of the same model and data") from None


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random state a run draws from, for its checkpoint: the loop's generator, torch's, and CUDA's."""
    return {"loop": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore(path: Path, ckpt: dict, model, ema, optimizer, scheduler, generator: torch.Generator, device: torch.device,
            train_size: int) -> tuple[list, int, int, torch.Tensor | None, dict | None]:
    """Load checkpoint path's training state into the run's objects (ema and scheduler may be None); a part that does
    not fit is one RunError naming it. Returns (history, epoch, step, the epoch's batch order, its sums so far)."""
    return restore_parts(path, ckpt, {"model": model, "ema": ema}, {"optimizer": optimizer, "scheduler": scheduler},
                         generator, device, train_size)


def restore_parts(path: Path, ckpt: dict, networks: dict, optimizers: dict, generator: torch.Generator,
                  device: torch.device, train_size: int) -> tuple[list, int, int, torch.Tensor | None, dict | None]:
    """restore for a run of several networks and optimizers (a GAN's generator, discriminator, average and their two
    optimizers): networks and optimizers map checkpoint keys to the objects their states load into, None for none.
    Returns what restore returns."""
    if ckpt["step"] and len(ckpt["order"]) != train_size:
        raise RunError(f"{path} was trained on other data than its run's data holds now: start a new run")
    with restoring(path, "weights"):
        for key, network in networks.items():
            if network is not None:
                network.load_state_dict(ckpt[key])
    with restoring(path, "optimizer state"):
        for key, optimizer in optimizers.items():
            if optimizer is not None:
                optimizer.load_state_dict(ckpt[key])
    with restoring(path, "random state"):
        generator.set_state(ckpt["rng"]["loop"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:  # dropout on the GPU draws from this one
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    order = ckpt["order"].to(device) if ckpt["step"] else None
    return ckpt["history"], ckpt["epoch"], ckpt["step"], order, ckpt.get("sums")


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


def resumed_config(run: Path, cfg: dict, ckpt, args, device: torch.device, not_saved=(), script="this script",
                   added=None) -> dict:
    """The settings a resumed run goes on with: its saved cfg (so it stays the same experiment), a typed --epochs aside.

    ckpt is None for a run stopped before its first save (it starts again from its config.json); args.given holds the
    flags typed (given_flags). RunError for what cannot go on: another kind of device than the one its random states
    belong to, a setting typed (silently ignoring it would leave the user believing it took effect), a finished run,
    a new length for a schedule laid out for the old one, a config from an older version of the script. added maps a
    setting newer than some saved runs to a function of their cfg giving the value they ran with, so they go on.
    """
    trained_on = "cpu" if ckpt is None or ckpt["rng"]["cuda"] is None else "cuda"
    if ckpt is not None and trained_on != device.type:
        raise RunError(f"{run} was trained on {trained_on}, this run is on {device.type}: resume it with --device {trained_on}")
    for name, value_in in (added or {}).items():
        cfg.setdefault(name, value_in(cfg))
    missing = sorted(set(vars(args)) - set(cfg) - set(not_saved))
    if missing:
        raise RunError(f"{run} was saved by an older {script} (it lacks {missing[0]!r}): start a new run")
    typed = [flag for dest, flag in args.given.items() if dest not in ("resume", "epochs", "device")]
    if typed:
        raise RunError(f"--resume goes on with the saved settings of {run}: drop {typed[0]} "
                       "(only --epochs and --device may be given)")
    done = len(ckpt["history"]) if ckpt else 0
    longer = "epochs" in args.given and args.epochs > done
    if (run / "metrics.json").is_file() and not longer:
        raise RunError(f"{run} has finished ({done} epochs; its results are in metrics.json): nothing to resume; "
                       f"--epochs above {done} trains it on (none and plateau schedules), or start a new run")
    if "epochs" in args.given and args.epochs != cfg["epochs"]:
        if cfg.get("scheduler") in ("onecycle", "cosine"):
            raise RunError(f"--epochs cannot change on resume: the {cfg['scheduler']} schedule of {run} was laid out "
                           f"for {cfg['epochs']} epochs")
        cfg["epochs"] = args.epochs
    return cfg


# ---------------------------------------------------------------- a script's main


def one_line_errors(body, *errors) -> int:
    """body()'s exit status; what a user can fix (RunError, `errors`, a file that cannot be written) and Ctrl-C
    become one line on stderr and status 2 or 130, never a traceback. Warnings print as one line each too."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        return body()
    except (RunError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file written outside this module's writer, e.g. a plot or an annotated photo
        print(f"error: could not write {e.filename} ({e.strerror or e}): free some space or make its folder writable",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (those save and stop by themselves)
        print("\nstopped (Ctrl-C): nothing half-written is kept; a started run goes on with --resume <its run folder>",
              file=sys.stderr)
        return 130


# Flags that are not settings of a run (what to do, not how to train, or folded into model_options): not saved.
NOT_SETTINGS = ("predict", "checkpoint", "resume", "given", "model_opt", "width")
# What every checkpoint holds to go on exactly where it was saved; a script adds its own (its labels, its best score).
TRAINING_STATE = ("model", "config", "ema", "optimizer", "scheduler", "epoch", "step", "order", "history", "rng")


def settings(args, command: str, device: torch.device, needs, not_saved, script: str,
             added=None) -> tuple[Path | None, dict | None, dict]:
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


# ---------------------------------------------------------------- flags


class FlagParser(argparse.ArgumentParser):
    """argparse that answers a wrong flag in one line (the usage of a script with 40 flags runs to 24), describes the
    script by the first paragraph of its docstring, and shows every flag's default in --help."""

    def __init__(self, docstring: str = "", **kwargs):
        super().__init__(description=docstring.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def add_run_flags(parser: argparse.ArgumentParser, out: str, task: str | None) -> argparse._ArgumentGroup:
    """The "run" and "inference" flag groups every script has; check_run_flags checks them.

    task: what --predict prints for each face; None for a generator, whose inference is --sample N instead (N
    generated images written as PNG files).
    """
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: the GPU when there is one")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on a GPU, fp32 "
                   "on a CPU; bf16 also pays on CPUs with AMX (Intel Xeon 4th generation and later): 2.8x the images/s of "
                   "fp32 on 2 such cores, but CPUs without AMX run it slower than fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model; on a GPU also with CUDA graphs: 1.6x the "
                   "images/s at batch 512 on an H100, after ~15 s of compiling")
    inference = "--predict" if task else "--sample"
    written = "the annotated copies (default: predictions/" if task else "the PNG files (default: samples/"
    g.add_argument("--out", default=out, help=f"parent folder of run folders; with {inference}, the folder for {written} "
                   "beside the checkpoint)")
    g.add_argument("--name", default=None, help="run folder name (default: model and time)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR (or RUN_DIR/last.pt) from its "
                   "last save, with its saved settings; --epochs may raise the total")
    g.add_argument("--dry-run", action="store_true", help="one epoch of two batches and a short evaluation: checks the whole "
                   "pipeline in seconds")
    i = parser.add_argument_group("inference")
    if task:
        i.add_argument("--predict", nargs="+", metavar="PHOTO", help=f"find the faces in these photos (MTCNN) and print each face's {task}")
    else:
        i.add_argument("--sample", type=int, metavar="N", default=None, help="write N generated images as PNG files into --out "
                       "(to score them elsewhere, e.g. with pytorch-fid or torch-fidelity), then stop")
    i.add_argument("--checkpoint", default=None, help=f"with {inference}: the best.pt or last.pt to use (a run folder: its best.pt)")
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
    """parser.error (one line) for run flags that cannot work; sets args.given, the flags typed on the command line."""
    args.given = given_flags(parser, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    inference = "--predict" if "predict" in vars(args) else "--sample"
    if vars(args).get("predict", vars(args).get("sample")) is not None and not args.checkpoint:
        parser.error(f"{inference} needs --checkpoint {parser.get_default('out')}/<run>/best.pt")


def key_values(items: list[str], flag: str) -> dict:
    """{"width": 16, "hidden": (64, 32), "downsample": "stride"} from ["width=16", "hidden=(64, 32)", "downsample=stride"].

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
    return Path(args.out) if "out" in args.given else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / name


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
