"""train_gan.py and what it adds to the package: both DCGANs to the parameter, the face-image reader and its held-out
part, DiffAugment, a synthetic run that learns, resume after Ctrl-C, --sample, divergence, and bad input."""

import json
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_gan
from facenets import augment, data, models, runs

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data",
    "synthetic",
    "--synthetic-count",
    "200",
    "--image-size",
    "16",
    "--width",
    "8",
    "--batch-size",
    "16",
    "--quality-count",
    "20",
    "20",
]


def run(tmp_path, *args):
    return train_gan.main([*TINY, "--out", str(tmp_path), *args])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run of the recipe on tiny synthetic faces: to sample from, resume against and damage."""
    out = tmp_path_factory.mktemp("gan")
    assert train_gan.main([*TINY, "--out", str(out), "--name", "r", "--epochs", "2"]) == 0
    return out / "r"


# ---------------------------------------------------------------- models


def test_the_concepcion_dcgan_has_the_reports_parameter_counts_and_shapes():
    g, d = models.build_gan("concepcion")
    # G: Dense 64 -> 8*8*64 (64*4096 + 4096 = 266,240); Conv2DTranspose 4x4 64->64 (65,600), 64->128 (131,200),
    # 128->256 (524,544); Conv2D 5x5 256->3 (19,203): 1,006,787, the report's figure.
    assert models.count_parameters(g) == 266_240 + 65_600 + 131_200 + 524_544 + 19_203 == 1_006_787
    # D: Conv2D 4x4 3->64 (3,136), 64->128 (131,200), 128->128 twice (262,272 each); 64x64 / 16 = 4x4x128 = 2,048
    # flattened: Dense 64 (131,136), Dense 64 (4,160), Dense 1 (65): 794,241.
    assert models.count_parameters(d) == 3_136 + 131_200 + 2 * 262_272 + 131_136 + 4_160 + 65 == 794_241
    assert g.latent == 64 and g.low == 0.0
    shapes, x = [], torch.randn(2, 64)
    for layer in [g.dense, g.reshape, *g.up, *g.out]:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    # Keras' 'same' transposed conv (kernel 4, stride 2) doubles the size: 8 -> 16 -> 32 -> 64
    assert (
        shapes[1] == (64, 8, 8)
        and shapes[3] == (64, 16, 16)
        and shapes[5] == (128, 32, 32)
        and shapes[7] == (256, 64, 64)
    )
    assert x.shape == (2, 3, 64, 64) and 0 <= x.min() and x.max() <= 1  # sigmoid: images in [0, 1]
    assert d(x).shape == (2, 1)
    assert d.features(x).shape == (2, 128, 4, 4)
    conv = g.up[0]  # glorot-uniform: bound sqrt(6 / (fan_in + fan_out)) with fan = 16 * channels
    bound = (6 / (16 * 64 + 16 * 64)) ** 0.5
    assert 0.9 * bound < conv.weight.abs().max() <= bound and not conv.bias.any()


def test_the_radford_dcgan_is_pytorch_examples_and_its_spectral_norm_form_drops_batchnorm():
    g, d = models.build_gan("dcgan")
    assert models.count_parameters(g) == 3_576_704 and models.count_parameters(d) == 2_765_568
    assert g.latent == 100 and g.low == -1.0
    x, shapes = torch.randn(4, 100), []
    for layer in g.up:
        x = layer(x if x.ndim == 4 else x[:, :, None, None])
        if isinstance(layer, torch.nn.ConvTranspose2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(512, 4, 4), (256, 8, 8), (128, 16, 16), (64, 32, 32)]
    image = g(torch.randn(4, 100))
    assert image.shape == (4, 3, 64, 64) and -1 <= image.min() and image.max() <= 1 and d(image).shape == (4, 1)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    norms = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert abs(torch.cat([c.weight.flatten() for c in convs]).std() - 0.02) < 0.002  # N(0, 0.02)
    assert len(norms) == 3 and abs(torch.cat([n.weight for n in norms]).mean() - 1) < 0.01  # N(1, 0.02)
    _, sn = models.build_gan("dcgan", spectral_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sn.modules())
    assert sum(torch.nn.utils.parametrize.is_parametrized(m) for m in sn.modules()) == 5
    for size, channels in ((32, 256), (128, 1024)):  # other powers of two add or drop a stage
        g, d = models.build_gan("dcgan", size)
        assert g(torch.randn(2, 100)).shape == (2, 3, size, size) and g.up[0].out_channels == channels


@pytest.mark.parametrize(
    "name, size, options, words",
    [
        ("dcgan", 48, {}, "power of two"),
        ("concepcion", 40, {}, "multiple of 16"),
        ("concepcion", 64, {"width": 32}, "has no option width"),
        ("dcgan", 64, {"width": -5}, "width=-5 must be a whole number"),
    ],
)
def test_wrong_gan_sizes_and_options_are_value_errors(name, size, options, words):
    with pytest.raises(ValueError, match=words):
        models.build_gan(name, size, **options)


# ---------------------------------------------------------------- data


def write_faces(folder: Path, count=6, size=(80, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"{i:03d}.jpg")


def test_face_images_from_a_folder_with_subfolders_and_from_a_zip(tmp_path):
    root = tmp_path / "faces"
    write_faces(root / "a", 3)
    write_faces(root / "b" / "deeper", 2)
    celeba = Image.new("RGB", (178, 218), (255, 0, 0))  # CelebA's aligned size: red bands above and below the square
    celeba.paste((0, 0, 255), (0, 20, 178, 198))
    celeba.save(root / "img_align.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "._hidden.jpg").write_bytes(b"macOS")
    (root / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 missing or unreadable images: broken.jpg"):
        faces = data.load_face_images(root, 32, cache_dir=tmp_path / "cache")
    assert faces.images.shape == (6, 3, 32, 32) and faces.images.dtype == torch.uint8
    assert faces.files == [
        "a/000.jpg",
        "a/001.jpg",
        "a/002.jpg",
        "b/deeper/000.jpg",
        "b/deeper/001.jpg",
        "img_align.jpg",
    ]
    square = faces.images[-1].int()
    assert square[2].min() > 200 and square[0].max() < 60  # the centre square: blue, no red band left
    again = data.load_face_images(root, 32, cache_dir=tmp_path / "cache")  # from the cache, no warning
    assert torch.equal(again.images, faces.images)

    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                z.write(path, f"top/{path.relative_to(root).as_posix()}")
        z.writestr("__MACOSX/top/._000.jpg", b"resource fork")
    with pytest.warns(UserWarning, match="top/broken.jpg"):
        zipped = data.load_face_images(archive, 32, cache_dir=tmp_path / "cache")
    assert torch.equal(zipped.images, faces.images) and zipped.files[0] == "top/a/000.jpg"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.mkdir(), "no images (.jpg, .jpeg, .png) in"),
        (lambda p: (p.mkdir(), (p / "x.txt").write_text("text")), "no images"),
        (
            lambda p: (p.mkdir(), (p / "x.jpg").write_bytes(b"junk"), (p / "y.png").write_bytes(b"junk")),
            "none of the 2 images",
        ),
        (lambda p: p.with_suffix(".zip").write_bytes(b"PK\x03\x04 damaged"), "is not a readable zip file"),
        (lambda p: p.with_suffix(".csv").write_text("a,b"), "neither a folder nor a .zip"),
        (lambda p: None, "does not exist"),
    ],
)
def test_bad_face_folders_are_one_line_data_errors(tmp_path, make, words):
    path = tmp_path / "faces"
    make(path)
    path = next(tmp_path.glob("faces*"), path)
    with warnings.catch_warnings(record=True), pytest.raises(data.DataError) as error:
        data.load_face_images(path, 32, cache_dir=tmp_path / "cache")
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_held_out_part_is_seeded_disjoint_and_never_trained_on():
    train, held = data.holdout_split(1000, 300, seed=0)
    assert len(held) == 300 and len(train) == 700 and not set(train.tolist()) & set(held.tolist())
    assert torch.equal(torch.cat([train, held]).sort().values, torch.arange(1000))
    assert torch.equal(data.holdout_split(1000, 300, seed=0)[1], held)
    assert not torch.equal(data.holdout_split(1000, 300, seed=1)[1], held)
    cfg = {"data": "synthetic", "synthetic_count": 200, "image_size": 16, "holdout": 5000}
    x_train, x_held = train_gan.load_faces({**cfg, "seed": 0})
    assert len(x_held) == 100 and len(x_train) == 100  # capped at half
    images = data.synthetic_attribute_faces(200, "celeba", 16, seed=0).images
    _, index = data.holdout_split(200, 100, train_gan.HOLDOUT_SEED)
    assert torch.equal(x_held, images[index])  # what quality compares against is not among the training images
    assert not any(torch.equal(x, y) for x in x_train[:20] for y in x_held)


# ---------------------------------------------------------------- DiffAugment


def test_diff_augment_keeps_shapes_passes_gradients_and_repeats_with_its_seed():
    x = (torch.rand(8, 3, 16, 16) * 2 - 1).requires_grad_()
    y = augment.diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G's gradient passes through it
    same = augment.diff_augment(x.detach(), generator=torch.Generator().manual_seed(0))
    other = augment.diff_augment(x.detach(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, y.detach()) and not torch.equal(other, same)
    ones = torch.ones(64, 3, 16, 16)
    shifted = augment.diff_augment(ones, "translation", generator=torch.Generator().manual_seed(0))
    assert (
        set(shifted.unique().tolist()) <= {0.0, 1.0} and 0 < (shifted == 0).float().mean() < 0.25
    )  # at most 2 of 16 rows/columns
    cut = augment.diff_augment(ones, "cutout", generator=torch.Generator().manual_seed(0))
    assert ((cut == 0).flatten(1).float().mean(1) <= 0.25).all() and (cut == 0).any()  # at most half the side
    assert torch.equal(augment.diff_augment(ones, "none"), ones)
    with pytest.raises(ValueError, match="unknown DiffAugment 'flip'"):
        augment.diff_augment(ones, "color,flip")


# ---------------------------------------------------------------- training


def test_a_short_synthetic_run_draws_better_faces_than_its_untrained_generator(tmp_path):
    # Radford's DCGAN (the preset) learns in the fewest steps: 36 of them here
    assert (
        train_gan.main(
            [
                "--data",
                "synthetic",
                "--synthetic-count",
                "1200",
                "--image-size",
                "16",
                "--width",
                "16",
                "--preset",
                "radford",
                "--epochs",
                "4",
                "--quality-count",
                "200",
                "200",
                "--out",
                str(tmp_path),
                "--name",
                "q",
            ]
        )
        == 0
    )
    folder = tmp_path / "q"
    for name in (
        "config.json",
        "log.csv",
        "last.pt",
        "best.pt",
        "metrics.json",
        "grid.png",
        "interpolation.png",
        "losses.png",
        *(f"grid-epoch-{e:03d}.png" for e in (1, 2, 3, 4)),
    ):
        assert (folder / name).is_file(), name
    trained = json.loads((folder / "metrics.json").read_text())["quality"]
    cfg = json.loads((folder / "config.json").read_text())
    torch.manual_seed(cfg["seed"])
    untrained, _ = train_gan.make_gan(cfg, torch.device("cpu"))
    cpu = torch.device("cpu")
    before = train_gan.quality(
        train_gan.drawing_copy(untrained, cpu, "fp32"), train_gan.load_faces(cfg)[1], 200, cpu, "fp32"
    )
    assert trained["fake_count"] == before["fake_count"] == 200
    assert trained["frechet_distance"] < 0.9 * before["frechet_distance"], (trained, before)
    assert trained["precision"] > before["precision"] + 0.1, (trained, before)
    assert 0 <= trained["real_vs_real_frechet"] < trained["frechet_distance"]
    log = (folder / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,g_loss,d_loss,d_real,d_fake,frechet_distance") and len(log) == 5
    assert Image.open(folder / "grid.png").size == (8 * 18 + 2, 8 * 18 + 2)


def test_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(finished, tmp_path, monkeypatch):
    calls, real = {"n": 0}, train_gan.real_batch

    def ctrl_c_on_the_fourth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_gan, "real_batch", ctrl_c_on_the_fourth_batch)
    assert run(tmp_path, "--name", "c", "--epochs", "2") == 130
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train_gan, "real_batch", real)
    assert train_gan.main(["--resume", str(tmp_path / "c")]) == 0
    a, b = (torch.load(folder / "last.pt", weights_only=True) for folder in (finished, tmp_path / "c"))
    for part in ("model", "discriminator", "ema", "optimizer", "d_optimizer"):
        assert torch.equal(
            torch.cat([t.flatten() for t in _tensors(a[part])]), torch.cat([t.flatten() for t in _tensors(b[part])])
        ), part
    assert a["trace"] == b["trace"] and a["history"][-1]["g_loss"] == b["history"][-1]["g_loss"]
    metrics_json = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics_json["resumed_with"] == [f"train_gan.py --resume {tmp_path / 'c'}"]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state.float()]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return [torch.tensor(float(state))] if isinstance(state, (int, float)) else []


def test_sample_writes_pngs_for_other_fid_tools_and_never_mixes_them(finished, tmp_path, capsys):
    out = tmp_path / "fakes"
    assert train_gan.main(["--sample", "7", "--checkpoint", str(finished), "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(7)]
    assert Image.open(files[0]).size == (16, 16) and Image.open(files[0]).mode == "RGB"
    capsys.readouterr()
    assert train_gan.main(["--sample", "7", "--checkpoint", str(finished / "best.pt"), "--out", str(out)]) == 2
    assert "already holds PNG files" in one_line_error(capsys)
    assert (
        train_gan.main(["--sample", "2", "--checkpoint", str(finished / "last.pt")]) == 0
    )  # default: samples/ beside it
    assert len(list((finished / "samples").glob("*.png"))) == 2


def test_nan_losses_stop_with_status_3_and_keep_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runs, "SAVE_EVERY", 0)  # a save after every step: the last good one must survive
    calls, g_loss = {"n": 0}, train_gan.g_loss

    def nan_from_the_fourth_step(fake, loss):
        calls["n"] += 1
        return g_loss(fake, loss) * (float("nan") if calls["n"] >= 4 else 1.0)

    monkeypatch.setattr(train_gan, "g_loss", nan_from_the_fourth_step)
    with pytest.warns(UserWarning, match="training diverged .*NaN"):
        code = run(tmp_path, "--name", "nan", "--epochs", "3")
    captured = capsys.readouterr()
    assert code == train_gan.DIVERGED == 3
    kept = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert all(t.isfinite().all() for t in _tensors(kept["model"]) + _tensors(kept["discriminator"]))
    assert "keeps last.pt" in captured.out and not (tmp_path / "nan" / "metrics.json").exists()


def test_a_discriminator_certain_for_too_long_stops_with_status_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_gan, "certain", lambda real, fake, loss: torch.tensor(True))
    with pytest.warns(UserWarning, match="D has told every real from every generated image with certainty for 2 steps"):
        assert run(tmp_path, "--name", "d", "--dry-run", "--diverge-steps", "2") == 3


def test_the_concepcion_preset_is_the_reports_setup(tmp_path):
    assert (
        train_gan.main(
            [
                "--data",
                "synthetic",
                "--synthetic-count",
                "200",
                "--image-size",
                "32",
                "--preset",
                "concepcion",
                "--dry-run",
                "--out",
                str(tmp_path),
                "--name",
                "k",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    assert (cfg["model"], cfg["loss"], cfg["lr_g"], cfg["lr_d"], cfg["betas"], cfg["batch_size"], cfg["epochs"]) == (
        "concepcion",
        "bce",
        1e-4,
        1e-4,
        [0.9, 0.999],
        32,
        30,
    )
    assert (cfg["ema"], cfg["diffaugment"], cfg["flip"], cfg["gan_options"]) == (
        0.0,
        "none",
        False,
        {"spectral_norm": False},
    )
    assert Image.open(tmp_path / "k" / "grid-epoch-001.png").size == (8 * 34 + 2, 8 * 34 + 2)


def test_a_time_budget_ends_training_mid_epoch_and_still_measures_the_generator(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(train_gan.time, "perf_counter", lambda: clock.__setitem__("t", clock["t"] + 1.0) or clock["t"])
    # Each look at the clock is 1 s later: a budget of 0.1 minute (6 s) ends training within the first epoch.
    assert run(tmp_path, "--name", "b", "--epochs", "5", "--time-budget", "0.1") == 0
    folder = tmp_path / "b"
    result = json.loads((folder / "metrics.json").read_text())
    assert result["epochs_run"] == 1 and result["quality"]["fake_count"] == 20
    assert (folder / "grid.png").is_file() and not (folder / "grid-epoch-002.png").exists()
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--model", "concepcion", "--width", "32"], "has no option width (--width)"),
        (["--diffaugment", "color,flip"], "unknown DiffAugment 'flip'"),
        (["--sample", "10"], "--sample needs --checkpoint"),
        (["--quality-count", "5", "100"], "--quality-count need at least 10"),
        (["--betas", "0.5", "1.5"], "--betas and --ema must each be in [0, 1)"),
        (["--time-budget", "0"], "--time-budget must be a positive number of minutes"),
    ],
)
def test_impossible_flags_are_one_line(flags, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_gan.parse_args(flags)
    assert exit_.value.code == 2 and words in one_line_error(capsys)


def test_bad_data_and_sizes_are_one_line_and_leave_no_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_gan.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "runs"), "--dry-run"]) == 2
    assert "no images (.jpg, .jpeg, .png) in" in one_line_error(capsys)
    write_faces(tmp_path / "few", 30, (40, 40))
    assert (
        train_gan.main(
            [
                "--data",
                str(tmp_path / "few"),
                "--image-size",
                "16",
                "--cache",
                str(tmp_path / "cache"),
                "--out",
                str(tmp_path / "runs"),
                "--dry-run",
            ]
        )
        == 2
    )
    assert "holds 30 readable images: a GAN needs thousands" in one_line_error(capsys)
    assert run(tmp_path / "runs", "--image-size", "48", "--dry-run") == 2
    assert "needs an image size that is a power of two" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_checkpoints_of_another_script_or_model_are_one_line(finished, tmp_path, capsys):
    import train_emotion

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
                str(tmp_path),
                "--name",
                "e",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert train_gan.main(["--sample", "3", "--checkpoint", str(tmp_path / "e"), "--out", str(tmp_path / "s")]) == 2
    assert "lacks 'discriminator'" in one_line_error(capsys)
    assert train_gan.main(["--resume", str(tmp_path / "e")]) == 2
    assert "lacks 'discriminator'" in one_line_error(capsys)
    other = torch.load(finished / "best.pt", weights_only=True)
    other["config"]["gan_options"]["width"] = 16  # the weights of width 8 under a width-16 config
    torch.save(other, tmp_path / "other.pt")
    assert (
        train_gan.main(["--sample", "3", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "s")]) == 2
    )
    assert "does not fit this run: its weights cannot be loaded" in one_line_error(capsys)
    assert train_emotion.main(["--predict", "x.jpg", "--checkpoint", str(finished / "best.pt")]) == 2
    assert "lacks 'classes'" in one_line_error(capsys)


def test_help_documents_every_flag():
    assert not [a.option_strings for a in train_gan.build_parser()._actions if not a.help]
    shown = subprocess.run(
        [sys.executable, str(ROOT / "train_gan.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--preset" in shown and "--sample" in shown and "exit status 3" in shown.replace("\n", " ")


@pytest.mark.parametrize("face", ["one face", "black"])
def test_a_data_set_of_copies_of_one_image_trains_and_scores_as_collapsed(face, tmp_path, capsys):
    # It once stopped after epoch 1 with a traceback ("k = 1 nearest neighbours need more than 1 points"), no last.pt.
    image = data.synthetic_attribute_faces(1, "celeba", 32).images[0] if face == "one face" else torch.zeros(3, 32, 32)
    (tmp_path / "faces").mkdir()
    for i in range(60):
        Image.fromarray(image.to(torch.uint8).permute(1, 2, 0).numpy()).save(tmp_path / "faces" / f"{i:03d}.png")
    assert (
        train_gan.main(
            [
                "--data",
                str(tmp_path / "faces"),
                "--cache",
                str(tmp_path / "cache"),
                "--image-size",
                "16",
                "--width",
                "8",
                "--batch-size",
                "16",
                "--holdout",
                "20",
                "--quality-count",
                "20",
                "20",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
                "--name",
                "r",
            ]
        )
        == 0
    )
    quality = json.loads((tmp_path / "r" / "metrics.json").read_text())["quality"]
    assert (tmp_path / "r" / "last.pt").is_file() and quality["real_vs_real_frechet"] == 0.0
    # The real images' balls have radius 0: only an exact copy would cover them, and 2 steps make none. (Recall
    # may be anything: the one real image can lie inside the generated images' balls.)
    assert quality["coverage"] == 0.0 and 0 <= quality["recall"] <= 1
    assert "coverage 0.000, recall" in capsys.readouterr().out


def test_the_quality_line_leads_with_the_headline_scores(finished):
    assert train_gan.QUALITY_KEYS[:3] == ("frechet_distance", "coverage", "recall")
    log = (finished / "log.csv").read_text().splitlines()[0]
    assert log.startswith("epoch,g_loss,d_loss,d_real,d_fake,frechet_distance,coverage,recall,precision,density")
    assert list(json.loads((finished / "metrics.json").read_text())["quality"])[:3] == list(train_gan.QUALITY_KEYS[:3])


def test_images_that_cannot_be_scored_leave_a_warning_and_a_finished_run(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("GAN quality needs 6 or more generated and real images")

    monkeypatch.setattr(train_gan.metrics, "gan_quality", refuse)
    with pytest.warns(UserWarning, match="quality not measured: GAN quality needs 6 or more"):
        assert run(tmp_path, "--name", "v", "--epochs", "1") == 0
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["quality"] is None
    assert (tmp_path / "v" / "last.pt").is_file()
