"""train_emotion.py under failure: kill -9 at any moment, checkpoints that do not fit, bad model options, huge
images, full or read-only disks, Ctrl-C while loading. Each failure is one line (or a skip with a warning) and loses
nothing that was written; a killed run always continues with --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_emotion
from facenets import data, runs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "synthetic", "--synthetic-count", "1050", "--model", "vgg", "--width", "8", "--batch-size", "32"]


def run(tmp_path, *args):
    return train_emotion.main([*FAST, "--out", str(tmp_path), *args])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run with validation, to predict with, resume and damage (copies only)."""
    out = tmp_path_factory.mktemp("finished")
    assert (
        train_emotion.main(
            [*FAST, "--out", str(out), "--name", "r", "--epochs", "2", "--val-fraction", "0.2", "--scheduler", "none"]
        )
        == 0
    )
    return out / "r"


# ---------------------------------------------------------------- 1. kill -9 at any moment

# The child is train_emotion itself, with last.pt rewritten every SAVE_EVERY seconds (30 by default) and, with
# DIE_IN_SAVE=n, killed by a real SIGKILL halfway through writing its n-th checkpoint.
CHILD = """
import os, signal, sys, torch
sys.path.insert(0, os.environ["ROOT"])
import train_emotion
from facenets import runs
runs.SAVE_EVERY = float(os.environ["SAVE_EVERY"])
real_save, saves = torch.save, [0]
def save(state, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] == int(os.environ.get("DIE_IN_SAVE", 0)):
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, f, *args, **kwargs)
torch.save = save
sys.exit(train_emotion.main(sys.argv[1:]))
"""
KILLED = -signal.SIGKILL


def start(args, save_every, die_in_save=0):
    env = {**os.environ, "ROOT": str(ROOT), "SAVE_EVERY": str(save_every), "DIE_IN_SAVE": str(die_in_save)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def kill_when(proc, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == KILLED


def saved_position(path):
    try:
        ckpt = torch.load(path, weights_only=True)
    except (OSError, RuntimeError):  # not there yet
        return None
    return ckpt["epoch"], ckpt["step"]


def test_kill_9_early_mid_epoch_and_during_a_save_always_resumes_to_the_same_result(tmp_path):
    flags = [*FAST, "--epochs", "4", "--scheduler", "none", "--optimizer", "adam", "--lr", "1e-3"]
    assert train_emotion.main([*flags, "--out", str(tmp_path), "--name", "straight"]) == 0
    folder, last = tmp_path / "k", tmp_path / "k" / "last.pt"
    command = [*flags, "--out", str(tmp_path), "--name", "k"]

    # Early: killed before its first save, which comes SAVE_EVERY seconds into training...
    kill_when(start(command, save_every=30), lambda: (folder / "config.json").exists())
    assert not last.exists()
    # ...--resume starts it again from its config.json; killed again after a save inside an epoch...
    kill_when(start(["--resume", str(folder)], save_every=0.05), lambda: (saved_position(last) or (0, 0))[1] > 0)
    # ...which holds the exact position, so the same --resume goes on from there: at most SAVE_EVERY seconds lost.
    epoch, step = saved_position(last)
    kill_when(
        start(["--resume", str(folder)], save_every=0.05), lambda: (saved_position(last) or (0, 0)) > (epoch, step)
    )
    before = last.read_bytes()
    # During a save: the half-written temporary file never replaces last.pt.
    proc = start(["--resume", str(folder)], save_every=0.05, die_in_save=2)
    assert proc.wait() == KILLED
    assert saved_position(last) is not None and last.read_bytes() != before  # the first save went through whole
    # A scheduler's SIGTERM (a cluster taking the machine back) is a Ctrl-C: the step ends, last.pt is saved.
    position = saved_position(last)
    proc = start(["--resume", str(folder)], save_every=0.05)
    while (saved_position(last) or position) <= position:  # training again
        time.sleep(0.02)
    position = saved_position(last)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 130 and saved_position(last) > position
    proc = start(["--resume", str(folder)], save_every=0.05)
    assert proc.wait() == 0, proc.stderr.read()
    assert same_weights(tmp_path / "straight" / "last.pt", last)  # bit-exact, as if never stopped
    result = json.loads((folder / "metrics.json").read_text())
    assert result["epochs_run"] == 4 and len(result["resumed_with"]) == 5
    assert result["command"].startswith("train_emotion.py --data synthetic") and "--resume" in result["resumed_with"][0]
    assert not list(folder.glob(".*.tmp"))


def test_the_same_command_takes_over_a_folder_stranded_before_its_first_save(tmp_path, capsys):
    stranded = tmp_path / "s"
    stranded.mkdir()
    (stranded / "config.json").write_text("{}")
    (stranded / ".last.pt.tmp").write_bytes(b"PK half")
    assert run(tmp_path, "--name", "s", "--dry-run") == 0
    assert (stranded / "metrics.json").is_file() and not (stranded / ".last.pt.tmp").exists()


# ---------------------------------------------------------------- 2. checkpoints that load but do not fit


def edited(finished, tmp_path, name, change):
    """A copy of the finished run's folder, its last.pt and best.pt changed by change(ckpt)."""
    folder = tmp_path / name
    folder.mkdir()
    for file in ("last.pt", "best.pt", "config.json"):
        ckpt = torch.load(finished / file, weights_only=True) if file.endswith(".pt") else None
        if ckpt is None:
            (folder / file).write_text((finished / file).read_text())
            continue
        change(ckpt)
        torch.save(ckpt, folder / file)
    return folder


def other_width(ckpt):
    ckpt["config"]["model_options"] = {"width": 16}


def other_model(ckpt):
    ckpt["config"]["model"], ckpt["config"]["model_options"] = "rna_cifar", {}


def five_classes(ckpt):
    ckpt["classes"] = ckpt["classes"][:5]


@pytest.mark.parametrize(
    "change, words",
    [
        (other_width, "does not fit this run: its weights"),
        (other_model, "does not fit this run: its weights"),
        (five_classes, "does not fit this run: its weights"),
        (lambda ckpt: ckpt.pop("classes"), "lacks 'classes'"),
    ],
)
def test_predict_with_a_checkpoint_that_does_not_fit_is_one_line(finished, tmp_path, capsys, change, words):
    folder = edited(finished, tmp_path, "e", change)
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(folder / "best.pt")]) == 2
    assert words in one_line_error(capsys)


@pytest.mark.parametrize(
    "change, words",
    [
        (other_width, "does not fit this run: its weights"),
        (other_model, "does not fit this run: its weights"),
        (five_classes, "trained on other classes"),
        (lambda ckpt: ckpt.pop("rng"), "lacks 'rng'"),
        (lambda ckpt: ckpt["rng"].update(loop=torch.zeros(3)), "its random state cannot be loaded"),
        (lambda ckpt: ckpt["optimizer"]["param_groups"].pop(), "its optimizer state cannot be loaded"),
    ],
)
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(finished, tmp_path, capsys, change, words):
    folder = edited(finished, tmp_path, "e", change)
    (folder / "metrics.json").unlink(missing_ok=True)
    assert train_emotion.main(["--resume", str(folder), "--epochs", "3"]) == 2
    assert words in one_line_error(capsys)


# ---------------------------------------------------------------- 3. model options torch would reject


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--width", "-5"], "width=-5 must be a whole number"),
        (["--model-opt", "width=-3"], "width=-3 must be a whole number"),
        (["--model", "utec_arch2", "--model-opt", "hidden=-1"], "hidden=-1 must be a whole number"),
        (["--model-opt", "width=abc"], "width='abc' must be a whole number"),
        (["--model-opt", "width=0"], "width=0 must be a whole number"),
        (["--model-opt", "in_channels=3"], "in_channels is not a model option"),
        (["--model", "monterrey_baseline", "--width", "16"], "has no option 'width'"),
    ],
)
def test_model_options_torch_would_reject_are_refused_with_the_flags(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_:
        train_emotion.main(["--data", "synthetic", "--out", str(tmp_path), "--dry-run", *flags])
    assert exit_.value.code == 2 and words in one_line_error(capsys)
    assert "--crop 0" not in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_a_network_too_big_for_memory_is_one_line(tmp_path, capsys):
    assert run(tmp_path, "--dry-run", "--width", "1000000000") == 2
    assert "needs more memory than any machine has" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- 4. decompression bombs


def test_an_image_over_pillows_bomb_limit_is_skipped_by_predict(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # so that a 120x120 photo is a "bomb" (over 2 x 5000 pixels)
    Image.new("RGB", (120, 120)).save(tmp_path / "huge.png")
    Image.new("RGB", (60, 60)).save(tmp_path / "small.png")
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(5, 5, 50, 50)])
    args = [
        "--predict",
        str(tmp_path / "huge.png"),
        str(tmp_path / "small.png"),
        "--checkpoint",
        str(finished / "best.pt"),
        "--out",
        str(tmp_path / "p"),
    ]
    assert train_emotion.main(args) == 0
    out = capsys.readouterr().out
    assert "huge.png: skipped, over Pillow's limit of 0 megapixels" in out and "small.png face 1" in out


# ---------------------------------------------------------------- 5. disks that are full or read-only


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert train_emotion.main([*FAST, "--out", str(tmp_path / "afile"), "--dry-run"]) == 2
    assert "cannot make the folder" in one_line_error(capsys) and (tmp_path / "afile").read_text() == "mine"


def full_disk_for(target_names, monkeypatch):
    """Every write of a temporary file for one of target_names meets a real full disk (/dev/full: ENOSPC)."""
    real_open = open

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and any(Path(path).name == f".{name}.tmp" for name in target_names):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(runs, "open", open_on_full_disk, raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_save(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--name", "f", "--epochs", "1", "--scheduler", "none") == 0
    before = (tmp_path / "f" / "last.pt").read_bytes()
    (tmp_path / "f" / "metrics.json").unlink()
    full_disk_for(["last.pt"], monkeypatch)
    assert train_emotion.main(["--resume", str(tmp_path / "f"), "--epochs", "2"]) == 2
    error = one_line_error(capsys)
    assert (
        "could not write" in error and "last.pt (the disk is full)" in error and f"--resume {tmp_path / 'f'}" in error
    )
    assert (tmp_path / "f" / "last.pt").read_bytes() == before and not list((tmp_path / "f").glob(".*.tmp"))
    monkeypatch.undo()
    assert train_emotion.main(["--resume", str(tmp_path / "f"), "--epochs", "2"]) == 0


def read_only(folder, monkeypatch):
    """A folder nobody may write in: chmod where that binds (not for root, who CI often is), else at os.replace."""
    real_replace = os.replace

    def refuse(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(runs.os, "replace", refuse)


def test_a_run_folder_made_read_only_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--name", "ro", "--epochs", "1", "--scheduler", "none") == 0
    (tmp_path / "ro" / "metrics.json").unlink()
    read_only(tmp_path / "ro", monkeypatch)
    assert train_emotion.main(["--resume", str(tmp_path / "ro"), "--epochs", "2"]) == 2
    assert "(Permission denied): free some space or make" in one_line_error(capsys)
    assert saved_position(tmp_path / "ro" / "last.pt") == (1, 0)


def test_predict_beside_a_read_only_checkpoint_is_one_line_and_can_write_elsewhere(
    finished, tmp_path, capsys, monkeypatch
):
    Image.new("RGB", (60, 60)).save(tmp_path / "me.png")
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(5, 5, 50, 50)])
    read_only(finished / "predictions", monkeypatch)
    args = ["--predict", str(tmp_path / "me.png"), "--checkpoint", str(finished / "best.pt")]
    assert train_emotion.main(args) == 2
    assert "(Permission denied): check its permissions" in one_line_error(capsys)
    assert train_emotion.main([*args, "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "me_emotions.jpg").is_file()


# ---------------------------------------------------------------- 6, 7. what --resume refuses


@pytest.mark.parametrize("flag", [["--width", "16"], ["--lr", "0.2"], ["--model-opt", "dropout=0.3"], ["--out", "x"]])
def test_resume_refuses_any_setting_typed_even_its_default(finished, tmp_path, capsys, flag):
    folder = edited(finished, tmp_path, "e", lambda ckpt: None)
    assert train_emotion.main(["--resume", str(folder), *flag]) == 2  # --lr 0.2 is the default: still refused
    assert f"drop {flag[0]} (only --epochs and --device" in one_line_error(capsys)


def test_resume_of_a_finished_run_changes_nothing(finished, capsys):
    before = {name: (finished / name).read_bytes() for name in ("metrics.json", "last.pt", "best.pt")}
    assert train_emotion.main(["--resume", str(finished)]) == 2
    assert "has finished (2 epochs" in one_line_error(capsys)
    assert {name: (finished / name).read_bytes() for name in before} == before


def test_resume_takes_the_run_folder_or_its_last_pt(tmp_path):
    assert run(tmp_path, "--name", "h", "--epochs", "1", "--scheduler", "none") == 0
    (tmp_path / "h" / "metrics.json").unlink()
    assert train_emotion.main(["--resume", str(tmp_path / "h" / "last.pt"), "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "h" / "metrics.json").read_text())["epochs_run"] == 2


# ---------------------------------------------------------------- 8. --predict's names and exit status


def test_predict_keeps_photos_of_the_same_name_apart_and_fails_when_none_can_be_read(
    finished, tmp_path, capsys, monkeypatch
):
    for folder, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (60, 60), colour).save(tmp_path / folder / "x.jpg")
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(5, 5, 50, 50)])
    out = tmp_path / "p"
    assert (
        train_emotion.main(
            [
                "--predict",
                str(tmp_path / "a/x.jpg"),
                str(tmp_path / "b/x.jpg"),
                "--checkpoint",
                str(finished),
                "--out",
                str(out),
            ]
        )
        == 0
    )  # a run folder: its best.pt
    reds = {name: Image.open(out / name).getpixel((30, 30))[0] for name in ("a_x_emotions.jpg", "b_x_emotions.jpg")}
    assert reds["a_x_emotions.jpg"] > 150 > reds["b_x_emotions.jpg"]
    capsys.readouterr()
    assert (
        train_emotion.main(
            ["--predict", str(tmp_path / "gone.jpg"), str(tmp_path / "a"), "--checkpoint", str(finished)]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "gone.jpg: skipped, no such file" in captured.out and "a: skipped, a folder" in captured.out
    assert captured.err.strip() == "error: none of the 2 photos could be read: check the paths"


# ---------------------------------------------------------------- 9. Ctrl-C while the data loads


def test_ctrl_c_while_the_data_loads_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(data, "synthetic_faces", interrupted)
    # Python's own Ctrl-C handler, also where pytest runs in the background (nohup, &), which ignores SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert run(tmp_path, "--dry-run") == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "stopped (Ctrl-C)" in one_line_error(capsys) and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- 10. the smaller ones


def test_checkpoints_that_are_text_or_folders(finished, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint at all")
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(tmp_path / "notes.pt")]) == 2
    assert "is not a PyTorch checkpoint file" in one_line_error(capsys)  # was "(pop from empty list)"
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(tmp_path)]) == 2
    assert "is a folder without a best.pt" in one_line_error(capsys)  # was "not found"


def test_a_wrong_flag_is_one_line_not_the_usage():
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_emotion.py"), "--epochs", "many"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train_emotion.py: error: argument --epochs: invalid int value: 'many' (--help lists every flag)"
    ]
