"""train_emotion.py end to end on synthetic faces: learning, run folder, resume, Ctrl-C, predict, bad input."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_emotion
from facenets import data

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "synthetic", "--synthetic-count", "1050", "--model", "vgg", "--width", "8", "--batch-size", "32"]


def run(tmp_path, *args):
    return train_emotion.main([*FAST, "--out", str(tmp_path), *args])


def test_short_run_learns_and_writes_a_complete_run_folder(tmp_path, recwarn):
    # With the recipe's defaults (crops, erasing, mixup, EMA), 10 epochs learn reliably: seeds 0-5 gave 0.97-1.00
    assert run(tmp_path, "--name", "r", "--epochs", "10", "--lr", "0.05", "--val-fraction", "0.1") == 0
    assert not [w for w in recwarn if "stopped learning" in str(w.message)]  # a healthy run is not called dead
    folder = tmp_path / "r"
    for name in ("config.json", "log.csv", "metrics.json", "curves.png", "confusion.png", "best.pt", "last.pt"):
        assert (folder / name).is_file(), name
    result = json.loads((folder / "metrics.json").read_text())
    assert result["test_accuracy"] > 0.8  # chance is 1/7
    assert result["split_sizes"]["test"] == 210 and result["split_sizes"]["val"] > 0
    assert set(result["test_accuracy_by_usage"]) == {"PublicTest"}
    assert len((folder / "log.csv").read_text().splitlines()) == 1 + 10
    assert 0 < result["test_accuracy_without_tta"] <= 1 and 0 < result["test_accuracy_without_ema"] <= 1
    assert result["command"].startswith("train_emotion.py --data synthetic") and result["command"].endswith(
        "--val-fraction 0.1"
    )


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_a_network_that_stopped_learning_is_told_at_once(tmp_path):
    # lr 30 blows the weights up within two steps, after which every image gets the same output
    with pytest.warns(UserWarning, match="same output for every validation image: it has stopped learning"):
        assert run(tmp_path, "--dry-run", "--lr", "30", "--val-fraction", "0.2", "--synthetic-count", "280") == 0


def test_resume_continues_exactly_where_a_run_stopped(tmp_path):
    common = [
        "--scheduler",
        "none",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--mixup",
        "0.2",
        "--erasing",
        "0.5",
        "--val-fraction",
        "0.2",
    ]
    assert run(tmp_path, "--name", "straight", "--epochs", "2", *common) == 0
    assert run(tmp_path, "--name", "halves", "--epochs", "1", *common) == 0
    last, best = (torch.load(tmp_path / "halves" / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert last["best_acc"] == best["best_acc"] > 0  # the resumed run must know the best epoch so far
    assert train_emotion.main(["--resume", str(tmp_path / "halves"), "--epochs", "2"]) == 0
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "halves" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "halves" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2"]
    chosen = [
        {k: json.loads((tmp_path / n / "metrics.json").read_text())[k] for k in ("best_epoch", "best_val_accuracy")}
        for n in ("straight", "halves")
    ]
    assert chosen[0] == chosen[1]


# 1050 synthetic faces hold 840 Training ones: 26 steps of 32 per epoch
@pytest.mark.parametrize("stop_at_call, saved_at", [(3, (0, 3)), (26, (1, 0))])  # inside an epoch, and at its last step
def test_ctrl_c_saves_last_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch, stop_at_call, saved_at):
    assert run(tmp_path, "--name", "straight", "--epochs", "2", "--erasing", "0.5") == 0
    calls = {"n": 0}
    real = train_emotion.augment_batch

    def ctrl_c_during_a_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_emotion, "augment_batch", ctrl_c_during_a_batch)
    assert run(tmp_path, "--name", "c", "--epochs", "2", "--erasing", "0.5") == 130
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == saved_at
    monkeypatch.setattr(train_emotion, "augment_batch", real)
    assert train_emotion.main(["--resume", str(tmp_path / "c")]) == 0
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "c" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the interrupted epoch's loss and accuracy cover all its steps, as in the straight run
    logged = [
        [line.split(",")[1:3] for line in (tmp_path / n / "log.csv").read_text().splitlines()[1:]]
        for n in ("straight", "c")
    ]
    assert logged[0] == logged[1]
    assert (tmp_path / "c" / "metrics.json").is_file()


REPORT = ["--crop", "0", "--tta", "none", "--ema", "0"]  # the recipe's defaults that no report used


@pytest.mark.parametrize(
    "flags",
    [
        [
            *REPORT,
            "--model",
            "monterrey_baseline",
            "--split",
            "monterrey",
            "--no-augment",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--scheduler",
            "none",
        ],
        [
            *REPORT,
            "--model",
            "rna_cifar",
            "--model-opt",
            "downsample=stride",
            "--mixup-lam",
            "0.7",
            "--shear",
            "0.2",
            "--scheduler",
            "plateau",
        ],
        [*REPORT, "--model", "rna_cifar", "--cutout", "8", "--optimizer", "rmsprop"],
        [*REPORT, "--model", "udine_r1", "--sobel-channels", "--split", "udine"],
        [
            *REPORT,
            "--model",
            "utec_arch1",
            "--brightness",
            "0.1",
            "--contrast",
            "1.5",
            "--split",
            "utec",
            "--stop-loss",
            "5",
        ],
        ["--crop", "40", "--tta", "tencrop", "--val-fraction", "0", "--scheduler", "cosine"],
        ["--tta", "flip", "--split", "official", "--val-fraction", "0.2"],
        [
            "--mixup",
            "0",
            "--cutmix",
            "1",
            "--model-opt",
            "hidden=(32, 32)",
            "--sam",
            "0.05",
        ],  # candidates for the recipe
        ["--model", "resnet18", "--tta", "none", "--ema", "0"],  # 11M parameters at full resolution: one test pass only
    ],
)
def test_report_configurations_run_end_to_end(tmp_path, flags):
    base = [f for f in FAST if f not in ("--model", "vgg", "--width", "8")] if "--model" in flags else FAST
    assert train_emotion.main([*base, "--out", str(tmp_path), "--name", "d", "--dry-run", *flags]) == 0
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["epochs_run"] == 1


def test_predict_annotates_every_face(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "--name", "p", "--epochs", "1", "--crop", "44") == 0
    photo = tmp_path / "group.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, 200x300, with the EXIF note to turn it, as phones do
    Image.new("RGB", (300, 200), (128, 100, 90)).rotate(90, expand=True).save(photo, exif=exif)
    # MTCNN is tested in test_data.py; here a fixed detector checks everything after it.
    seen = []
    monkeypatch.setattr(
        data,
        "detect_faces",
        lambda image, device="cpu": seen.append(image.size) or [(10, 20, 110, 140), (150, 30, 260, 170)],
    )
    assert (
        train_emotion.main(
            ["--predict", str(photo), str(tmp_path / "missing.jpg"), "--checkpoint", str(tmp_path / "p" / "best.pt")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("face ") == 2 and "missing.jpg: skipped" in out
    probabilities = [
        float(w)
        for w in out.split("face 1 at")[1].splitlines()[0].replace(",", " ").split()
        if w.replace(".", "").isdigit()
    ]
    # seven probabilities printed to 2 decimals, each up to 0.005 off: their sum is 1 within 0.035
    assert abs(sum(probabilities[-7:]) - 1) <= 0.035
    annotated = Image.open(tmp_path / "p" / "predictions" / "group_emotions.jpg")
    # upright, as the photo is shown (and enlarged, so that its labels can be read)
    assert seen == [(300, 200)] and annotated.width / annotated.height == 1.5 and annotated.width >= 300


def test_a_checkpoint_saved_before_precision_existed_still_predicts(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "--name", "old", "--dry-run") == 0
    ckpt = torch.load(tmp_path / "old" / "best.pt", weights_only=False)
    del ckpt["config"]["precision"]
    torch.save(ckpt, tmp_path / "old" / "best.pt")
    Image.new("RGB", (120, 100), (128, 100, 90)).save(tmp_path / "one.jpg")
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(10, 10, 70, 80)])
    assert (
        train_emotion.main(["--predict", str(tmp_path / "one.jpg"), "--checkpoint", str(tmp_path / "old" / "best.pt")])
        == 0
    )
    assert "face 1 at" in capsys.readouterr().out


@pytest.mark.skipif(not os.environ.get("FACENETS_DATA"), reason="FACENETS_DATA not set")
def test_predict_finds_a_real_face_with_mtcnn(tmp_path, capsys):
    photos = sorted((Path(os.environ["FACENETS_DATA"]) / "utkface" / "crop_part1").glob("*.jpg"))[:1]
    if not photos:
        pytest.skip("no UTKFace photos")
    assert run(tmp_path, "--name", "m", "--dry-run") == 0
    assert train_emotion.main(["--predict", str(photos[0]), "--checkpoint", str(tmp_path / "m" / "best.pt")]) == 0
    assert "face 1 at" in capsys.readouterr().out


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_missing_data_says_where_to_get_it(tmp_path, capsys):
    assert train_emotion.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "FER-2013" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())  # no empty run folder left behind


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "best.pt").write_bytes(b"precious")
    assert run(tmp_path, "--name", "taken", "--dry-run") == 2
    assert "already holds a run" in one_line_error(capsys)
    assert (tmp_path / "taken" / "best.pt").read_bytes() == b"precious"


def test_resume_of_a_missing_run_and_a_damaged_checkpoint(tmp_path, capsys):
    assert train_emotion.main(["--resume", str(tmp_path / "none")]) == 2
    assert "cannot resume" in one_line_error(capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 and then no zip at all")  # a damaged (truncated) checkpoint
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(bad)]) == 2
    assert "could not be read" in one_line_error(capsys)
    torch.save(argparse.Namespace(lr=0.1), bad)  # a pickled object that weights_only loading refuses
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(bad)]) == 2
    line = one_line_error(capsys)
    assert "could not be read" in line and len(line) < 250, (
        line
    )  # torch's paragraph of advice cut to its first sentence
    torch.save(torch.nn.Linear(2, 2).state_dict(), bad)  # weights, but not from a facenets run
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(bad)]) == 2
    assert "not a facenets checkpoint" in one_line_error(capsys)


def test_a_run_resumes_only_on_the_kind_of_device_it_was_trained_on(tmp_path, capsys):
    assert run(tmp_path, "--name", "g", "--dry-run") == 0
    ckpt = torch.load(tmp_path / "g" / "last.pt", weights_only=True)
    ckpt["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as saved by a run on a GPU
    torch.save(ckpt, tmp_path / "g" / "last.pt")
    assert train_emotion.main(["--resume", str(tmp_path / "g"), "--device", "cpu"]) == 2
    assert "trained on cuda" in (error := one_line_error(capsys)) and "--device cuda" in error


def test_pretrained_weights_that_cannot_be_downloaded_are_one_line(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    assert (
        train_emotion.main(
            [
                "--data",
                "synthetic",
                "--synthetic-count",
                "700",
                "--out",
                str(tmp_path),
                "--dry-run",
                "--model",
                "rna_resnet50",
                "--pretrained",
            ]
        )
        == 2
    )
    assert "could not be downloaded" in (error := one_line_error(capsys)) and "drop --pretrained" in error
    assert not any(tmp_path.iterdir())  # no empty run folder left behind


def test_resuming_a_run_saved_without_a_newer_setting_is_one_line(tmp_path, capsys):
    assert run(tmp_path, "--name", "old", "--dry-run") == 0
    ckpt = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    del ckpt["config"]["cutmix"]  # as saved before --cutmix existed
    torch.save(ckpt, tmp_path / "old" / "last.pt")
    assert train_emotion.main(["--resume", str(tmp_path / "old")]) == 2
    assert "older train_emotion.py" in one_line_error(capsys)


def test_changing_epochs_of_a_onecycle_run_or_any_setting_on_resume_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--name", "o", "--dry-run") == 0
    assert train_emotion.main(["--resume", str(tmp_path / "o"), "--epochs", "5"]) == 2
    assert "cannot change" in one_line_error(capsys)
    assert train_emotion.main(["--resume", str(tmp_path / "o"), "--lr", "0.5"]) == 2
    assert "drop --lr" in one_line_error(capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--predict", "a.jpg"], "--checkpoint"),
        (["--tta", "tencrop", "--crop", "0"], "--crop"),
        (["--crop", "60"], "--crop"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--model-opt", "oops"], "KEY=VALUE"),
        (["--model", "nope"], "invalid choice"),
        (["--cutmix", "1"], "--mixup 0"),
        (["--mixup", "-1"], "Beta parameter"),
        (["--sam", "-0.1"], "--sam"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--split", "udine", "--val-fraction", "0.1"], "its own validation part"),
        (["--zoom", "1.5"], "--zoom must be in"),
        (["--erasing", "2"], "--erasing"),
        (["--rotate", "-5"], "--rotate"),
    ],
)
def test_impossible_flags_are_refused_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_emotion.parse_args(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unknown_model_option_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # refused with the flags, before any data is read
        run(tmp_path, "--name", "u", "--dry-run", "--model-opt", "wings=3")
    assert exit_.value.code == 2 and "wings" in one_line_error(capsys)


def test_a_model_too_small_for_the_crops_is_told_about_crop_0_and_only_then(tmp_path, capsys):
    common = ["--data", "synthetic", "--synthetic-count", "700", "--out", str(tmp_path), "--dry-run"]
    assert (
        train_emotion.main([*common, "--model", "monterrey_baseline"]) == 2
    )  # 'valid' convs: 40x40 shrinks to nothing
    assert "too small" in (error := one_line_error(capsys)) and "--crop 0" in error
    assert train_emotion.main([*common, "--model", "vgg", "--crop", "12"]) == 2  # four pools: 12 -> 6 -> 3 -> 1 -> 0
    assert "too small" in (error := one_line_error(capsys)) and "--crop 0" in error
    with pytest.raises(SystemExit):
        train_emotion.main([*common, "--model", "vgg", "--model-opt", "hidden=abc"])
    assert "hidden='abc' must be" in (error := one_line_error(capsys)) and "--crop" not in error


def test_help_documents_every_flag():
    undocumented = [a.option_strings for a in train_emotion.build_parser()._actions if not a.help]
    assert not undocumented
    shown = subprocess.run(
        [sys.executable, str(ROOT / "train_emotion.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--sobel-channels" in shown and "monterrey_baseline" in shown


def test_data_without_test_images_points_to_a_pooled_split(tmp_path, capsys):
    for i, emotion in enumerate(data.EMOTIONS * 3):
        folder = tmp_path / "fer" / "train" / emotion
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (48, 48), 10 * i).save(folder / f"Training_{i}.png")
    args = [
        "--data",
        str(tmp_path / "fer"),
        "--out",
        str(tmp_path / "runs"),
        "--cache",
        str(tmp_path / "cache"),
        "--dry-run",
    ]
    assert train_emotion.main(args) == 2
    assert "--split utec" in one_line_error(capsys)
    assert train_emotion.main([*args, "--split", "utec", "--model", "monterrey_baseline", *REPORT]) == 0


def test_sam_steps_with_the_gradient_at_the_weights_moved_uphill():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 4), torch.nn.Flatten())  # [B, 1, 4, 4] -> 3 logits
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    cfg = {"mixup": 0, "mixup_lam": None, "cutmix": 0, "label_smoothing": 0.0, "sam": 0.05, "precision": "fp32"}

    def grads_at(params):
        probe = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 4), torch.nn.Flatten())
        with torch.no_grad():
            for p, value in zip(probe.parameters(), params):
                p.copy_(value)
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        return [p.grad for p in probe.parameters()]

    start = [p.detach().clone() for p in model.parameters()]
    g0 = grads_at(start)
    norm = torch.sqrt(sum((g**2).sum() for g in g0))
    g1 = grads_at([w + 0.05 * g / norm for w, g in zip(start, g0)])
    train_emotion.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, cfg, torch.Generator())
    for p, w, g in zip(model.parameters(), start, g1):
        assert torch.allclose(p, w - 0.1 * g, atol=1e-6)
    assert not torch.allclose(g1[0], g0[0])  # the two gradients differ, so the test tells SAM from plain SGD


def test_a_dry_run_leaves_no_run_folder_unless_out_is_given(tmp_path, monkeypatch, capsys):
    # dry runs left 38 MB run folders behind each time: runs/ reached 1.3 GB
    monkeypatch.chdir(tmp_path)
    assert train_emotion.main(["--data", "synthetic", "--synthetic-count", "280", "--width", "8", "--dry-run"]) == 0
    assert "removed at the end" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    assert (
        train_emotion.main(
            [
                "--data",
                "synthetic",
                "--synthetic-count",
                "280",
                "--width",
                "8",
                "--dry-run",
                "--out",
                "kept",
                "--name",
                "d",
            ]
        )
        == 0
    )
    assert (tmp_path / "kept" / "d" / "metrics.json").is_file()


def test_output_to_a_file_holds_lines_not_progress_bar_updates(tmp_path, capsys):
    # a log of 10 epochs redirected to a file held 100 KB of the progress bar's carriage-return updates
    flags = ["--data", "synthetic", "--synthetic-count", "280", "--width", "8", "--epochs", "2", "--batch-size", "32"]
    assert train_emotion.main([*flags, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "epoch   2" in out
    assert "model: vgg {'width': 8}, " in out  # was "vgg , 4,742,700 parameters" without options
