"""What every facenets training loop needs around it, once: device, bf16, compile, optimizer and schedule, the
weight average and the optimisation flags. The loops themselves stay in the scripts; the run around them
(checkpoints, resuming, Ctrl-C) is runs.py's.

    device = training.pick_device("auto")
    optimizer = training.make_optimizer(model, cfg)          # cfg: the flags of add_optimizer_flags, as a dict
    scheduler = training.make_scheduler(optimizer, cfg, steps_per_epoch)
    average = training.WeightAverage(model, 0.999)           # validate and test average.module
    for step in ...:
        with training.autocast(device, cfg["precision"]):
            loss = ...
        ...
        average.update(step + 1)

Only torch and the standard library: the module can be copied alone into another project.
"""

import argparse
import copy
import ctypes
from contextlib import nullcontext
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- device


def pick_device(choice: str = "auto") -> torch.device:
    """ "cpu", "cuda" or "auto" (the GPU when there is one); asking for cuda without one is a ValueError."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the OS after every step.

    Otherwise each step's activations (tens of MB) are mapped and page-faulted in anew: measured on 2 CPU cores,
    monterrey_baseline trains 30% faster with this. No effect on GPU memory; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: serve blocks up to 256 MB from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MB of freed heap
    except (OSError, AttributeError):
        pass


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bf16_units() -> str | None:
    """The name of this CPU's bf16 instructions, "AMX" or "AVX-512 BF16" (Linux /proc/cpuinfo), else None."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return None
    flags = set(flags.split())
    return "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else None


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for "bf16", and for "auto" on a GPU; fp32 otherwise.

    bf16 on CUDA roughly doubles throughput and needs no loss scaling. On a CPU it pays where the CPU has bf16
    instructions (cpu_bf16_units): measured on 2 cores, 2.8x the images/s of fp32 with Intel's AMX (vgg width 16
    at 96 px), 1.6-1.7x with AMD Zen 4's AVX-512 BF16 (vgg width 32 at 64 px, batch 64); CPUs with neither run it slower
    than fp32. "auto" leaves CPUs in fp32, so that every recorded CPU figure reproduces with its command;
    suggest_precision says when bf16 would pay.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, torch.bfloat16)
    return nullcontext()


def suggest_precision(device: torch.device, precision: str) -> None:
    """Print a hint at the start of a CPU run in fp32 where this CPU's bf16 instructions would train faster."""
    units = cpu_bf16_units() if device.type == "cpu" and precision != "bf16" else None
    if units:
        print(f"hint: this CPU has {units}: --precision bf16 trains 1.6-2.8x faster than fp32 on such CPUs")


def compiled(model: torch.nn.Module, device: torch.device):
    # At these sizes the GPU waits for Python to launch kernels; CUDA graphs ("reduce-overhead") launch the whole
    # forward and backward at once: 75k instead of 41k images/s for vgg at batch 512 on an H100.
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take: free GPU memory, or on a CPU Linux's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def check_memory(device: torch.device, batch_size: int, *networks) -> None:
    """MemoryError (one line, with the estimate and the limit) when training networks at batch_size cannot fit in
    device's memory, said before anything is allocated: each network is (build, input shapes of one image), built on
    PyTorch's meta device, which has shapes but no storage. The estimate: fp32 weights, gradients and two optimizer
    moments, and every layer's output for batch_size images, which the backward pass keeps. shapes may be a function
    of the network (a generator's latent size)."""
    need, fix = 0, "choose a smaller width, image size or batch size"
    with torch.device("meta"):
        for build, shapes in networks:
            try:
                network, outputs = build(), []
            except RuntimeError as e:  # a size past what torch can even count
                if "overflow" not in str(e):
                    raise
                raise MemoryError(f"training this needs more memory than any machine has: {fix}") from None
            shapes = shapes(network) if callable(shapes) else shapes
            for module in network.modules():
                if not list(module.children()):
                    module.register_forward_hook(
                        lambda m, i, out: outputs.append(out.numel() if torch.is_tensor(out) else 0)
                    )
            network(*[torch.zeros(1, *shape) for shape in shapes])
            need += 4 * (4 * sum(p.numel() for p in network.parameters()) + batch_size * sum(outputs))
    available = available_memory(device)
    if available is not None and need > available:
        raise MemoryError(
            f"training this needs about {need / 1e9:,.1f} GB of memory at batch {batch_size}, and "
            f"{device.type} has {available / 1e9:,.1f} GB available: {fix}"
        )


# ----------------------------------------------------------------------------- optimisation


def add_optimizer_flags(parser: argparse.ArgumentParser, **defaults) -> argparse._ArgumentGroup:
    """The "optimisation" flag group every script has; defaults (epochs=, lr=, ...) are the script's own."""
    d = {
        **dict(
            epochs=30,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            label_smoothing=0.0,
            ema=0.0,
            scheduler="onecycle",
        ),
        **defaults,
    }
    g = parser.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=int,
        default=d["epochs"],
        help="passes over the training set; on --resume, a new total (none and plateau schedules only)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="images per training step, all processes together: under torchrun each of N processes takes "
        "batch-size/N of them (N must divide it), so that N processes take the steps and lr schedule of one",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch, not each process's share (slower)",
    )
    g.add_argument(
        "--optimizer",
        default=d["optimizer"],
        choices=("adam", "sgd", "rmsprop"),
        help="sgd is with Nesterov momentum (none with --momentum 0)",
    )
    g.add_argument("--lr", type=float, default=d["lr"], help="learning rate (peak rate under onecycle)")
    g.add_argument(
        "--momentum",
        type=float,
        default=None,
        help="sgd momentum, 0.9 if not given; onecycle without it cycles "
        "the momentum (adam: beta1) from 0.95 down to 0.85 at the peak lr and back",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="L2 penalty on weights (not on biases or BatchNorm)",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d["label_smoothing"],
        help="share of each target spread over all classes",
    )
    g.add_argument(
        "--ema",
        type=float,
        default=d["ema"],
        help="also keep an exponential moving average of the weights, "
        "with this decay per step (e.g. 0.999), and validate and test it; 0 = off",
    )
    g.add_argument(
        "--scheduler",
        default=d["scheduler"],
        choices=("none", "plateau", "onecycle", "cosine"),
        help="learning-rate schedule; plateau watches the validation loss (training loss without validation)",
    )
    g.add_argument(
        "--patience", type=int, default=10, help="plateau: epochs without improvement before lr /= 10 (Keras' default)"
    )
    g.add_argument("--min-lr", type=float, default=1e-7, help="plateau: lowest lr")
    g.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the weights, the batch order and the augmentation"
    )
    return g


def check_optimizer_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (one line, exit 2) for optimisation flags that cannot work."""
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    if args.lr <= 0 or args.weight_decay < 0 or (args.momentum is not None and not 0 <= args.momentum < 1):
        parser.error("--lr must be positive, --weight-decay 0 or more, --momentum in [0, 1)")
    if not 0 <= args.label_smoothing < 1:
        parser.error("--label-smoothing must be in [0, 1)")
    if not 0 <= args.ema < 1:
        parser.error("--ema must be in [0, 1): a decay per step such as 0.999, or 0 for none")
    if args.patience < 0 or args.min_lr < 0:
        parser.error("--patience and --min-lr must be 0 or more")


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters: decaying them only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "sgd":
        # fused: one kernel per step for all parameters instead of several per tensor; the loop is launch-bound on a GPU
        momentum = 0.9 if cfg["momentum"] is None else cfg["momentum"]  # --momentum 0: plain SGD, as Keras' default
        return torch.optim.SGD(
            groups, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0, fused=next(model.parameters()).is_cuda
        )
    if cfg["optimizer"] == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg["lr"])
    return torch.optim.Adam(groups, lr=cfg["lr"])


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int):
    """The --scheduler of cfg: onecycle and cosine step every batch, plateau every epoch, none is None."""
    total = cfg["epochs"] * steps_per_epoch
    if cfg["scheduler"] == "onecycle":
        # Cycling the momentum against the lr is part of the one-cycle policy (Smith 2018); a given --momentum is kept
        # fixed instead, and RMSprop, which has no momentum of its own here, is left without.
        cycle = cfg["momentum"] is None and cfg["optimizer"] != "rmsprop"
        # A quarter of the steps warm up; a run of under 8 steps (a few images) needs two for each phase to exist.
        if total < 3:
            raise ValueError(
                f"--scheduler onecycle needs at least 3 steps and this run has {total}: use more "
                "--epochs, a smaller --batch-size, or --scheduler none"
            )
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, cfg["lr"], total_steps=total, pct_start=max(0.25, 2 / total), cycle_momentum=cycle
        )
    if cfg["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if cfg["scheduler"] == "plateau":
        # Keras' ReduceLROnPlateau defaults (factor 0.1, patience 10, an absolute min_delta of 1e-4): the reports that
        # used it give only the range of the lr, and their Keras code would have had these.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.1, patience=cfg["patience"], min_lr=cfg["min_lr"], threshold=1e-4, threshold_mode="abs"
        )
    return None


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated in one foreach call.

    The average usually validates and tests better than the live weights; the live model is what trains.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(model).requires_grad_(False), decay
        self._average, self._live = self._floats(self.module), self._floats(model)

    @staticmethod
    def _floats(model):
        """The floating-point tensors of model.state_dict(), sharing their storage (so updates land in the model)."""
        return [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, done: int):
        """average = d * average + (1 - d) * live, after `done` steps. d starts lower (as in TensorFlow's
        ExponentialMovingAverage), so that the random initial weights soon fade out."""
        d = min(self.decay, (1 + done) / (10 + done))
        torch._foreach_lerp_(self._average, self._live, 1 - d)
