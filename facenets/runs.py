"""Run keeping: the run folder, checkpoints, the csv log and result files.

Every file is written to a temporary name beside its target and then renamed, so a crash or
Ctrl-C in the middle of a write leaves the previous version intact, never half a file.
Checkpoints are plain dicts of tensors, numbers and strings, loaded with weights_only=True:
loading a checkpoint never runs code from it.
"""
import csv
import json
import os
from pathlib import Path

import torch


class RunError(Exception):
    """A run setting, folder or checkpoint the user can fix; str(e) is one line saying what to do."""


def replace_atomically(path, write):
    """Call write(tmp_path), then rename tmp_path over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj):
    return replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(path, state: dict):
    return replace_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} not found: pass a best.pt or last.pt from a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        # torch's own message can run to a paragraph (weights_only advice): its first sentence is enough here
        reason = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise RunError(f"checkpoint {path} could not be read ({reason}): it is not a facenets checkpoint or "
                       "it is damaged") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():  # e.g. a bare state_dict from elsewhere
        raise RunError(f"{path} is not a facenets checkpoint (it has no model and config): pass a best.pt or last.pt "
                       "from a run folder")
    return state


def run_dir(root, name, resume=False) -> Path:
    """runs/<task>/<name>/: a new run must not overwrite an old one; --resume reuses it."""
    path = Path(root) / name
    if resume:
        if not (path / "last.pt").is_file():
            raise RunError(f"cannot resume: {path / 'last.pt'} does not exist")
    elif path.exists() and any(path.iterdir()):
        raise RunError(f"run folder {path} already exists: pick another --name, or add --resume to continue it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_log(path, history: list[dict]):
    """Rewrite the whole csv log from history, so a resumed run never holds rows twice."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    return replace_atomically(path, write)
