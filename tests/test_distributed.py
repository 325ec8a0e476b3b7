"""The scripts under torchrun on CPU with gloo: 2 processes train one model as 1 would, a stop or a dead process ends
them all, a stopped run resumes under torchrun, two "nodes" meet over 127.0.0.1, and what is not supported says so.

Each launch costs seconds of imports per process on 2 shared cores: few, tiny runs, each shared by several checks.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Two processes on two cores: one thread each. Unbuffered, so that a line is read when it is printed, not when a
# buffer fills: the stop test signals after "epoch   1", which otherwise came out with the run's end
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 1,600 training faces, 25 steps of 64 per epoch: process 0 and 1 take 32 of each batch
EMOTION = ["train_emotion.py", "--data", "synthetic", "--synthetic-count", "2000", "--width", "8", "--batch-size", "64"]
ATTRIBUTES = ["train_attributes.py", "--data", "synthetic", "--synthetic-count", "600", "--image-size", "32"]
ATTRIBUTES += ["--model", "vgg", "--width", "8", "--batch-size", "32", "--epochs", "2"]


def torchrun(*args, nodes=(), processes=2):
    return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(processes), *args]


def launch(command, timeout=180):
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def last_row(folder: Path) -> dict:
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture(scope="module")
def emotion(tmp_path_factory):
    """The same run, by one process and by two under torchrun --standalone."""
    out = tmp_path_factory.mktemp("emotion")
    one = launch([sys.executable, *EMOTION, "--epochs", "2", "--out", str(out / "one"), "--name", "run"])
    two = launch(torchrun("--standalone", *EMOTION, "--epochs", "2", "--out", str(out / "two"), "--name", "run"))
    return out, one, two


def test_two_processes_train_the_emotion_run_of_one_and_write_one_run_folder(emotion):
    out, (rc_one, log_one), (rc_two, log_two) = emotion
    assert rc_one == 0, log_one[-2000:]
    assert rc_two == 0, log_two[-2000:]
    assert [p.name for p in (out / "two").iterdir()] == ["run"]  # process 0 alone made and named it
    assert json.loads((out / "two" / "run" / "metrics.json").read_text())["epochs_run"] == 2
    assert log_two.count("test accuracy") == 1  # tested once, by process 0
    one, two = last_row(out / "one" / "run"), last_row(out / "two" / "run")
    assert one["lr"] == two["lr"]  # the same steps and schedule
    # The same seed, batch order and global batch; they differ by BatchNorm statistics over 32 images instead of 64
    # and by the augmentation draws. Three seeds of the 1-process run end at 1.86-1.96 (measured 2026-12-04): 0.2 is
    # twice that spread. A loss not summed over both processes would read half (~0.95).
    assert abs(float(one["train_loss"]) - float(two["train_loss"])) < 0.2, (one, two)


def test_a_stopped_torchrun_run_saves_once_and_resumes_under_torchrun(tmp_path):
    out = tmp_path / "runs"
    # 6 epochs of ~0.5 s: torchrun takes up to a second or two to pass the signal on, and the run must still be training
    command = torchrun("--standalone", *EMOTION, "--epochs", "6", "--out", str(out), "--name", "run")
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # Ctrl-C or a cluster's SIGTERM to torchrun reaches every process
        lines.append(line)
        if "epoch   1 " in line:  # not only at a line's start: the other process's stderr may share the line
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=60) != 0
    # after epoch 1 (the signal came before its end) or at the look after step 20 of epoch 2: process 0 says it
    said = [line for line in lines if "stopped " in line and "saved" in line]
    if not said and "results in" in "".join(lines):
        # Seen 2 times in ~15 runs on 2 shared cores: the whole run (6 short epochs) was over before torchrun passed
        # the signal on, so there was nothing left to stop. Not what this test is about: not counted.
        pytest.skip("the run had ended before the signal reached its processes")
    assert len(said) == 1, "".join(lines)[-2000:]
    ckpt = torch.load(out / "run" / "last.pt", weights_only=True)
    assert (ckpt["world_size"], len(ckpt["rng"]["augment"])) == (2, 2)
    assert ckpt["step"] in (0, 20), said  # both processes saved at the same place: an epoch's end or the look
    rc, log = launch(torchrun("--standalone", *EMOTION[:1], "--resume", str(out / "run")))
    assert rc == 0, log[-2000:]
    assert "resuming" in log and "epoch   6" in log
    assert json.loads((out / "run" / "metrics.json").read_text())["epochs_run"] == 6


def test_a_process_that_dies_ends_the_other_with_one_line(tmp_path):
    command = torchrun("--standalone", *EMOTION, "--epochs", "20", "--out", str(tmp_path), "--name", "run")
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1"):
            break
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    second = [pid for pid in workers if b"\0RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    t0 = time.perf_counter()
    os.kill(second[0], signal.SIGKILL)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=90) != 0
    assert time.perf_counter() - t0 < 90  # bounded by the process group's timeout (runs.PEER_TIMEOUT = 60 s)
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    said = [line for line in lines if line.startswith("error: another process of this torchrun run stopped")]
    assert len(said) == 1, "".join(lines)[-2000:]
    assert not any(line.startswith("[rank0]: Traceback") for line in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_127_0_0_1_train_the_attributes_run_of_one_process(tmp_path):
    rendezvous = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    rendezvous += ["--rdzv-id", "test"]
    where = ["--out", str(tmp_path / "two"), "--name", "run"]
    nodes = [
        subprocess.Popen(
            torchrun(*ATTRIBUTES, *where, nodes=[*rendezvous, "--node_rank", str(rank)], processes=1),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    one = launch([sys.executable, *ATTRIBUTES, "--out", str(tmp_path / "one"), "--name", "run"])
    logs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert one[0] == 0, one[1][-2000:]
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]
    assert "".join(logs).count("on the test part") == 1
    a, b = last_row(tmp_path / "one" / "run"), last_row(tmp_path / "two" / "run")
    # Within noise, as for the emotion run: 16 images per process's BatchNorm instead of 32, other augmentation draws;
    # measured 2026-12-04 they differ by less than 0.1 (a loss summed on one process alone would read half)
    assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 0.2, (a, b)


GAN = ["train_gan.py", "--data", "synthetic", "--synthetic-count", "240", "--holdout", "40", "--quality-count", "40"]
GAN += ["40", "--quality-every", "0", "--width", "8", "--batch-size", "32", "--epochs", "3"]


def test_two_processes_train_the_gan_of_one(tmp_path):
    rc_one, log_one = launch([sys.executable, *GAN, "--out", str(tmp_path / "one"), "--name", "run"])
    rc_two, log_two = launch(torchrun("--standalone", *GAN, "--out", str(tmp_path / "two"), "--name", "run"))
    assert rc_one == 0 and rc_two == 0, (log_one + log_two)[-2000:]
    folder = tmp_path / "two" / "run"
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"] and (folder / "grid.png").is_file()
    assert log_two.count("Fréchet distance") == 1  # scored once, by process 0
    # D's loss after 3 epochs: 1.27-1.36 over seeds 0-2 in one process, 1.36 and 1.44 in two (seeds 0, 1; they
    # draw other noise and augmentation), measured 2026-12-04; D's gradients left unaveraged leave each process's
    # D its own, and their losses apart
    one, two = last_row(tmp_path / "one" / "run"), last_row(folder)
    assert abs(float(one["d_loss"]) - float(two["d_loss"])) < 0.25, (one, two)


@pytest.mark.parametrize(
    "command, words",
    [
        ([*EMOTION[:-1], "63", "--epochs", "1"], "--batch-size 63 does not split over 2 processes"),
    ],
)
def test_what_torchrun_cannot_do_is_one_line(tmp_path, command, words):
    rc, log = launch(torchrun("--standalone", *command, "--out", str(tmp_path)))
    assert rc != 0
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and all(words in line for line in errors), log[-2000:]
    assert "[rank0]: Traceback" not in log and not list(tmp_path.iterdir())
