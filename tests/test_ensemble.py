"""--ensemble and --distill: the stacked network is its members, stacked training is N separate runs, and the runs,
resume, --predict, distillation and benchmarks/gpu_evidence.py --small work end to end on synthetic faces."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_emotion
from facenets import data, models, training

ROOT = Path(__file__).resolve().parents[1]
# 210 synthetic faces hold 168 Training ones: 5 steps of 32 per epoch
TINY = ["--data", "synthetic", "--synthetic-count", "210", "--model", "vgg", "--width", "4", "--batch-size", "32"]


def run(out, *args):
    return train_emotion.main([*TINY, "--out", str(out), *args])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def members_of(name, n=3, dtype=torch.float32, **options):
    torch.manual_seed(0)
    return [models.build_model(name, 1, 7, 16, **options).to(dtype) for _ in range(n)]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, atol):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.double(), y.double(), atol=atol, rtol=0), key


# ---------------------------------------------------------------- the stacked network is its members


@pytest.mark.parametrize(
    "name, options, n",
    [
        ("vgg", dict(width=4, dropout=0.0), 3),
        ("vgg", dict(width=4, hidden=(16, 8), dropout=0.0), 3),
        ("vgg", dict(width=4, upsample=2, dropout=0.0), 3),
        ("resnet18", {}, 2),
    ],
)
def test_the_stacked_network_computes_what_each_member_computes(name, options, n):
    nets = members_of(name, n, **options)
    stacked = models.stack_networks(nets).to(memory_format=torch.channels_last)
    x = torch.rand(4, n, 1, 16, 16)  # [B, member, C, H, W]
    for train in (True, False):  # batch statistics, and the running ones the training pass updated
        for net in (stacked, *nets):
            net.train(train)
        out = stacked(x.flatten(1, 2).contiguous(memory_format=torch.channels_last))
        assert out.shape == (4, n, 7)
        for i, net in enumerate(nets):
            assert torch.allclose(out[:, i], net(x[:, i]), atol=1e-5), (i, train)
    # float32 running statistics of grouped and of separate convolutions, summed in another order (which varies with
    # the CPU and the thread count: resnet18's running_var once came out 1e-6 apart), agree to a few ulps of ~1;
    # another member's statistics would be ~1e-1 apart
    for net, member in zip(nets, models.unstack(stacked)):
        assert_same_state(net, member, atol=1e-5)


def test_unstack_gives_back_the_very_networks_and_copies_them():
    nets = members_of("vgg", width=4, hidden=(8,))
    stacked = models.stack_networks(nets)
    back = models.unstack(stacked)
    for net, member in zip(nets, back):
        assert_same_state(net, member, atol=0)
    with torch.no_grad():
        back[0].features[0].weight.add_(1)
    assert not torch.equal(back[0].features[0].weight, stacked.net.features[0].weight[:4])


def test_layers_that_could_mix_members_and_networks_that_differ_are_refused():
    with pytest.raises(ValueError, match="cannot stack a LayerNorm"):
        models.stack_networks([torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.LayerNorm(2)) for _ in range(2)])
    with pytest.raises(ValueError, match="one architecture"):
        models.stack_networks([models.build_model("vgg", width=4), models.build_model("vgg", width=8)])


# ---------------------------------------------------------------- stacked training is N separate runs


CFG = {
    "mixup": 0.0,
    "mixup_lam": None,
    "cutmix": 0.0,
    "label_smoothing": 0.1,
    "sam": 0.0,
    "optimizer": "sgd",
    "momentum": None,
    "lr": 0.2,
    "weight_decay": 5e-3,
    "epochs": 1,
    "scheduler": "onecycle",
    "precision": "fp32",
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_the_stack_equals_training_each_member_alone(optimizer):
    cfg = {**CFG, "optimizer": optimizer, "lr": 0.2 if optimizer == "sgd" else 0.01}
    steps, n = 4, 3
    # float64: the comparison is then sharp (1e-9), so a small difference in the update shows
    nets = members_of("vgg", n, torch.float64, width=4, hidden=(8,), dropout=0.0)
    stacked = models.stack_networks(nets).to(memory_format=torch.channels_last)

    def trainer(model):
        optimizer = training.make_optimizer(model, cfg)
        # a one-cycle schedule laid out for 3 x 4 steps: the learning rate and the momentum change at every step
        return optimizer, training.make_scheduler(optimizer, cfg, 3 * steps), training.WeightAverage(model, 0.9)

    alone, together = [trainer(net) for net in nets], trainer(stacked)
    torch.manual_seed(1)
    for step in range(steps):
        x, y = torch.rand(n, 8, 1, 16, 16, dtype=torch.float64), torch.randint(0, 7, (n, 8))
        for (optimizer, scheduler, average), net, x_i, y_i in zip(alone, nets, x, y):
            train_emotion.train_step(net, optimizer, x_i, y_i, cfg, None)
            scheduler.step()
            average.update(step + 1)
        optimizer, scheduler, average = together
        loss, logits, labels = train_emotion.train_step(stacked, optimizer, x, y, cfg, None)
        scheduler.step()
        average.update(step + 1)
        assert logits.shape == (n, 8, 7) and torch.equal(labels, y)
    for net, member in zip(nets, models.unstack(stacked)):
        assert_same_state(net, member, atol=1e-9)
    for (_, _, average), member in zip(alone, models.unstack(together[2].module)):
        assert_same_state(average.module, member, atol=1e-9)
    assert not torch.allclose(nets[0].features[0].weight, nets[1].features[0].weight)  # they did not all learn the same


@pytest.mark.parametrize("flags", [{"mixup": 0.2}, {"mixup": 0.0, "cutmix": 1.0}])
def test_each_member_mixes_within_its_own_batch_with_its_own_lambda(flags):
    cfg = {**CFG, **flags}
    x, y = torch.rand(3, 8, 1, 16, 16), torch.randint(0, 7, (3, 8))
    mixed, y_a, y_b, lam = train_emotion.mix_members(x, y, cfg, torch.Generator().manual_seed(0))
    assert mixed.shape == (8, 3, 16, 16) and lam.shape == (3, 8)
    alone = torch.Generator().manual_seed(0)  # the members' draws, one member after the other
    for i in range(3):
        x_i, y_i, y_b_i, lam_i = train_emotion.mix(x[i], y[i], cfg, alone)
        assert torch.equal(mixed[:, i : i + 1], x_i) and torch.equal(y_b[i], y_b_i)
        assert torch.equal(lam[i], torch.as_tensor(lam_i).expand(8))
    assert len({round(value, 6) for value in lam[:, 0].tolist()}) == 3  # not one lambda for all


# ---------------------------------------------------------------- distillation's loss


def test_the_distillation_loss_blends_labels_and_the_teachers_softened_outputs():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 7))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 7))
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 4])
    cfg = {**CFG, "label_smoothing": 0.0, "distill_weight": 0.3, "distill_temperature": 2.0}
    with torch.no_grad():
        hard = torch.nn.functional.cross_entropy(student(x), y)
        p_teacher = (teacher(x) / 2).softmax(-1)
        kl = (p_teacher * (p_teacher.log() - (student(x) / 2).log_softmax(-1))).sum(1).mean()
    loss, _, _ = train_emotion.train_step(
        student, torch.optim.SGD(student.parameters(), lr=0.0), x, y, cfg, None, teacher
    )
    assert torch.allclose(loss, 0.7 * hard + 0.3 * 4 * kl, atol=1e-6)
    assert not torch.allclose(loss, hard, atol=1e-3)


def test_the_teacher_sees_the_very_mixed_images_the_student_sees():
    seen = {}

    def spy(who):
        def forward(module, args):
            seen[who] = args[0].clone()

        return forward

    student, teacher = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 7)) for _ in range(2))
    student.register_forward_pre_hook(spy("student"))
    teacher.register_forward_pre_hook(spy("teacher"))
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 7, (6,))
    cfg = {**CFG, "mixup": 0.4, "distill_weight": 0.5, "distill_temperature": 4.0}
    train_emotion.train_step(
        student, torch.optim.SGD(student.parameters(), lr=0.1), x, y, cfg, torch.Generator(), teacher
    )
    assert torch.equal(seen["teacher"], seen["student"]) and not torch.equal(seen["student"], x)


# ---------------------------------------------------------------- runs end to end


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """A finished two-epoch --ensemble 3 run, to check, resume against, predict with and distil."""
    out = tmp_path_factory.mktemp("ensemble")
    assert run(out, "--name", "e", "--epochs", "2", "--ensemble", "3") == 0
    return out / "e"


def test_an_ensemble_run_reports_its_members_and_their_average(ensemble_run):
    result = json.loads((ensemble_run / "metrics.json").read_text())
    ckpt = torch.load(ensemble_run / "best.pt", weights_only=True)
    assert ckpt["config"]["ensemble"] == 3 and "net.features.0.weight" in ckpt["model"]
    # Each member alone, as a plain network, on the test images: the figures metrics.json gives
    cfg = ckpt["config"]
    stacked = train_emotion.make_model(cfg, 1, 7, cfg["crop"], torch.device("cpu"))
    stacked.load_state_dict(ckpt["ema"])
    faces = data.synthetic_faces(210, seed=0)
    test = data.split_indices(faces, "official", 0.0, 0)["test"]
    x, y = faces.images[test], faces.labels[test]
    proba = [train_emotion.predict_proba(member, x, cfg) for member in models.unstack(stacked)]
    assert result["member_test_accuracies"] == [round((p.argmax(1) == y).float().mean().item(), 5) for p in proba]
    assert result["mean_member_test_accuracy"] == pytest.approx(sum(result["member_test_accuracies"]) / 3, abs=1e-5)
    assert set(result["mean_member_test_accuracy_by_usage"]) == {"PublicTest"}
    assert result["test_accuracy"] == round((sum(proba).argmax(1) == y).float().mean().item(), 5)  # the mean softmax


def test_ctrl_c_mid_epoch_then_resume_ends_where_the_uninterrupted_ensemble_ends(ensemble_run, tmp_path, monkeypatch):
    calls, real = {"n": 0}, train_emotion.augment_batch

    def ctrl_c_during_the_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_emotion, "augment_batch", ctrl_c_during_the_third_batch)
    assert run(tmp_path, "--name", "c", "--epochs", "2", "--ensemble", "3") == 130
    saved = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3) and saved["order"].shape == (168, 3)  # each member's own order
    monkeypatch.setattr(train_emotion, "augment_batch", real)
    assert train_emotion.main(["--resume", str(tmp_path / "c")]) == 0
    a, b = (torch.load(folder / "last.pt", weights_only=True) for folder in (ensemble_run, tmp_path / "c"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    logged = [(folder / "log.csv").read_text().splitlines()[1:] for folder in (ensemble_run, tmp_path / "c")]
    assert [line.split(",")[1:3] for line in logged[0]] == [line.split(",")[1:3] for line in logged[1]]


def test_predict_uses_the_whole_ensemble(ensemble_run, monkeypatch, capsys):
    from PIL import Image

    photo = ensemble_run.parent / "face.jpg"
    Image.new("RGB", (200, 160), (128, 100, 90)).save(photo)
    # MTCNN is tested in test_data.py; a fixed detector checks everything after it.
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(40, 20, 160, 150)])
    used, real = [], train_emotion.predict_proba
    monkeypatch.setattr(
        train_emotion, "predict_proba", lambda model, *a, **k: used.append(model) or real(model, *a, **k)
    )
    assert train_emotion.main(["--predict", str(photo), "--checkpoint", str(ensemble_run / "best.pt")]) == 0
    assert [getattr(model, "members", 1) for model in used] == [3]
    line = capsys.readouterr().out.split("face 1 at")[1].splitlines()[0]
    probabilities = [float(w) for w in line.replace(",", " ").split() if w.replace(".", "").isdigit()][-7:]
    assert abs(sum(probabilities) - 1) <= 0.035  # seven probabilities, each rounded to 2 decimals


def test_distilling_an_ensemble_into_one_network(ensemble_run, tmp_path):
    teacher = str(ensemble_run / "best.pt")
    assert run(tmp_path, "--name", "d", "--epochs", "1", "--distill", teacher, "--distill-weight", "0.7") == 0
    result = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert result["teacher"] == teacher and "member_test_accuracies" not in result
    # the same test images with the same test-time augmentation: the teacher's own figure
    assert result["teacher_test_accuracy"] == json.loads((ensemble_run / "metrics.json").read_text())["test_accuracy"]
    saved = torch.load(tmp_path / "d" / "best.pt", weights_only=True)
    assert saved["config"]["ensemble"] == 1 and "features.0.weight" in saved["model"]


def test_a_teacher_that_does_not_fit_is_one_line_and_leaves_no_run_folder(ensemble_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    ckpt = torch.load(ensemble_run / "best.pt", weights_only=True)
    torch.save({**ckpt, "classes": [c.upper() for c in ckpt["classes"]]}, tmp_path / "other.pt")  # 7, but not these
    out = tmp_path / "runs"
    for teacher, flags, words in [
        (tmp_path / "notes.txt", [], "not a PyTorch checkpoint"),
        (tmp_path / "other.pt", [], "other classes (ANGRY"),
        (ensemble_run / "best.pt", ["--crop", "36"], "--crop 40, this run has 36"),
    ]:
        assert run(out, "--name", "x", "--dry-run", "--distill", str(teacher), *flags) == 2
        assert words in one_line_error(capsys)
        assert not (out / "x").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ensemble", "0"], "--ensemble N takes a number"),
        (["--ensemble", "2", "--model", "udine_r2"], "--ensemble supports vgg and resnet18"),
        (["--ensemble", "2", "--sam", "0.05"], "without --sam"),
        (["--ensemble", "2", "--distill", "x.pt"], "without --distill"),
        (["--distill-weight", "0.3"], "need --distill"),
        (["--distill", "x.pt", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
        (["--distill", "x.pt", "--distill-temperature", "0"], "--distill-temperature above 0"),
    ],
)
def test_impossible_ensemble_and_distillation_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_emotion.parse_args(flags)
    assert exit_.value.code == 2 and message in one_line_error(capsys)


# ---------------------------------------------------------------- benchmarks/gpu_evidence.py


def load_evidence():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_evidence", ROOT / "benchmarks" / "gpu_evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_evidence_small_runs_every_row_and_writes_the_table(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_evidence.py"),
            "--small",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "evidence.md"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "evidence.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 7 and table in done.stdout
    for row in rows:  # every row has a wall time and an accuracy: none failed
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[1].endswith(" s") and cells[3].endswith("%"), row
    assert "ensemble of 8" in rows[3] and [cell.strip() for cell in rows[3].split("|")][5].endswith(
        "%"
    )  # members' mean
    assert "teacher" in rows[2] and "img/s" in rows[6] and "over 3 seeds" in table


def test_gpu_evidence_stops_a_row_at_the_deadline_and_names_a_failed_one(tmp_path):
    evidence = load_evidence()
    start = time.monotonic()
    why = evidence.run_until([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log", start + 1)
    assert why.startswith("stopped at --deadline") and time.monotonic() - start < 30
    why = evidence.run_until(
        [sys.executable, "-c", "import sys; print('no data here'); sys.exit(2)"],
        tmp_path / "bad.log",
        time.monotonic() + 60,
    )
    assert why == "failed (exit 2): no data here"
