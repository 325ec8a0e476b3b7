"""facenets.training: optimisation flags, optimizer and schedule, the weight average, stop requests."""

import signal

import pytest
import torch

from facenets import runs, training


def optimisation_flags(argv):
    parser = runs.FlagParser()
    training.add_optimizer_flags(parser, epochs=4, lr=0.1)
    args = parser.parse_args(argv)
    training.check_optimizer_flags(parser, args)
    return vars(args)


@pytest.mark.parametrize(
    "optimizer, momentum, expected",
    [
        ("sgd", None, (0.95, 0.85)),  # one-cycle momentum: high at the start, lowest at the peak lr (a quarter in)
        ("sgd", 0.5, (0.5, 0.5)),  # a given --momentum is kept
        ("rmsprop", None, (0.0, 0.0)),  # no momentum switched on behind the user's back
        ("sgd", 0.0, (0.0, 0.0)),  # plain SGD (Keras' default), which Nesterov would refuse
    ],
)
def test_onecycle_cycles_the_momentum_only_when_none_is_given(optimizer, momentum, expected):
    cfg = optimisation_flags(
        ["--optimizer", optimizer, *(["--momentum", str(momentum)] if momentum is not None else [])]
    )
    optimizer = training.make_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = training.make_scheduler(optimizer, cfg, steps_per_epoch=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    assert (seen[0], seen[-1]) == pytest.approx(expected)


def test_no_weight_decay_on_biases_and_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    decayed, plain = training.make_optimizer(model, optimisation_flags(["--weight-decay", "0.01"])).param_groups
    assert [p.shape for p in decayed["params"]] == [(2, 1, 3, 3)] and decayed["weight_decay"] == 0.01
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lr", "0"], "--lr must be positive"),
        (["--ema", "1"], "--ema must be"),
        (["--epochs", "0"], "--epochs and --batch-size"),
        (["--label-smoothing", "1"], "smoothing"),
    ],
)
def test_impossible_optimisation_flags_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit):
        optimisation_flags(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_the_weight_average_follows_the_live_weights_at_its_decay():
    model = torch.nn.Linear(3, 1)
    average = training.WeightAverage(model, decay=0.5)
    start = average.module.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1.0
    average.update(done=100)  # d = min(0.5, 101 / 110) = 0.5
    assert torch.allclose(average.module.weight, start + 0.5)
    average.update(done=0)  # early steps weigh the live weights more: d = 1 / 10
    assert torch.allclose(average.module.weight, start + 0.5 + 0.9 * 0.5)
    assert not average.module.weight.requires_grad


def test_a_stop_request_is_noted_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runs.StopRequests() as stop:
        assert not stop.asked
        signal.raise_signal(signal.SIGTERM)
        assert stop.asked
        with pytest.raises(KeyboardInterrupt):  # a second request stops at once
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize(
    "precision, dtype", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_precision_on_a_cpu_is_fp32_unless_bf16_is_asked_for(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with training.autocast(torch.device("cpu"), precision):
        assert layer(torch.ones(2, 4)).dtype == dtype
    with pytest.raises(ValueError, match="fp16"):
        training.autocast(torch.device("cpu"), "fp16")


def test_the_bf16_hint_follows_the_cpu_flags(monkeypatch, capsys):
    # decided from /proc/cpuinfo's flags, not from the CPU's brand: Intel's AMX and AMD Zen 4's AVX-512 BF16 both pay
    for flags, expected in [
        ("fpu sse avx512f amx_bf16 amx_tile", "AMX"),
        ("fpu avx512f avx512_bf16", "AVX-512 BF16"),
        ("fpu sse avx2", None),
    ]:
        monkeypatch.setattr(
            training.Path, "read_text", lambda self, flags=flags: f"processor\t: 0\nflags\t\t: {flags}\n"
        )
        assert training.cpu_bf16_units() == expected
        training.suggest_precision(torch.device("cpu"), "auto")
        said = capsys.readouterr().out
        assert (f"this CPU has {expected}: --precision bf16" in said) if expected else said == ""
        training.suggest_precision(torch.device("cpu"), "bf16")  # asked for already: nothing to say
        assert capsys.readouterr().out == ""


@pytest.mark.parametrize("total", [3, 4, 5, 7])
def test_onecycle_over_a_few_steps_warms_up_and_anneals(total):
    model = torch.nn.Linear(2, 2)
    cfg = {"epochs": 1, "optimizer": "sgd", "momentum": None, "lr": 0.1, "weight_decay": 0.0, "scheduler": "onecycle"}
    optimizer = training.make_optimizer(model, cfg)
    scheduler = training.make_scheduler(optimizer, cfg, total)  # raised ZeroDivisionError under 8 steps before
    rates = []
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert max(rates) == pytest.approx(0.1) and min(rates) < 0.01


def test_a_size_that_cannot_fit_is_refused_before_anything_is_allocated(monkeypatch):
    monkeypatch.setattr(training, "available_memory", lambda device: 8 << 30)
    small = (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), [(3, 32, 32)])
    training.check_memory(torch.device("cpu"), 64, small)
    # 100,000 x 100,000 weights would be 40 GB: built on the meta device, they are counted, never allocated
    huge = (lambda: torch.nn.Linear(100_000, 100_000), [(100_000,)])
    with pytest.raises(MemoryError, match=r"needs about 1\d\d\.\d GB of memory at batch 64, and cpu has 8\.6 GB"):
        training.check_memory(torch.device("cpu"), 64, huge)
