"""Run keeping: the run folder, checkpoints, the csv log and result files, and one-line errors for flags.

Every file is written to a temporary name beside its target and then renamed, so a crash, kill -9 or Ctrl-C
in the middle of a write leaves the previous version intact, never half a file; a write that fails (full disk,
read-only folder) says which file in one line and leaves the previous version as it was.
Checkpoints are plain dicts of tensors, numbers and strings, loaded with weights_only=True: loading a checkpoint
never runs code from it. A checkpoint that loads but does not fit (another network, another class count, a key
missing) is one line too, never a traceback: see load_checkpoint and restoring.
"""
import argparse
import csv
import json
import os
import shutil
import textwrap
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


# ---------------------------------------------------------------- flags


class FlagParser(argparse.ArgumentParser):
    """argparse that answers a wrong flag in one line (the usage of a script with 40 flags runs to 24)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


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
