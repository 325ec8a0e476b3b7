"""Three ways to train N networks at once, timed per step (forward, backward and optimizer step of all N):

  stacked   models.stack_networks: one network of grouped convolutions (what train_emotion.py --ensemble does)
  vmap      torch.func.stack_module_state + torch.vmap(functional_call): each weight stacked along a new first
            dimension, every layer run for all members by vmap's batching rules
  separate  N networks stepped one after another

    python benchmarks/bench_ensemble.py                     # vgg width 8, batch 64, N = 1 2 4, 5 rounds
    python benchmarks/bench_ensemble.py --device cuda --bf16 --width 64 --batch-size 512  # the recipe's sizes
    python benchmarks/bench_ensemble.py --small             # CI smoke run, a few seconds

Each member has its own batch of 40x40 crops, as in train_emotion.py --ensemble. Every (way, N) is timed once per
round, rounds one after the other, so that a busy spell of a shared machine hits all alike. It prints ms per step
(min-max over the rounds) and, for each way, the median step of N networks over the median of one (N = 1 is the
plain network, the same for all three ways).
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# benchmarks/ is not a package: put the repository root on the path, so that facenets imports from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from facenets import models  # noqa: E402

CROP, CLASSES = 40, 7
SMALL = dict(members=[1, 2], rounds=1, steps=2, warmup=1, width=4, batch_size=16)


def make_networks(n, width, seed=0):
    """N vgg networks, each with its own initial weights; no dropout, so that all three ways compute the same."""
    torch.manual_seed(seed)
    return [models.build_model("vgg", 1, CLASSES, CROP, width=width, dropout=0.0) for _ in range(n)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


class Stacked:
    def __init__(self, nets, device):
        self.model = models.stack_networks(nets).to(device, memory_format=torch.channels_last)
        self.optimizer = sgd(self.model.parameters())

    def step(self, x, y):
        """x [N, B, C, H, W], y [N, B] -> each member's loss [N]."""
        n, b = y.shape
        logits = self.model(x.transpose(0, 1).flatten(1, 2).contiguous(memory_format=torch.channels_last))
        losses = F.cross_entropy(logits.flatten(0, 1), y.t().flatten(), reduction="none").view(b, n).mean(0)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the sum: each member gets the gradient of its own loss
        self.optimizer.step()
        return losses.detach()


class Vmapped:
    def __init__(self, nets, device):
        # BatchNorm's running statistics are stacked too (batched buffers): vmap then allows their in-place update
        self.params, self.buffers = torch.func.stack_module_state([net.to(device) for net in nets])
        skeleton = copy.deepcopy(nets[0]).to("meta")

        def loss(params, buffers, x, y):
            return F.cross_entropy(torch.func.functional_call(skeleton, (params, buffers), (x,)), y)

        self.losses = torch.vmap(loss)
        self.optimizer = sgd(self.params.values())

    def step(self, x, y):
        losses = self.losses(self.params, self.buffers, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()


class Separate:
    def __init__(self, nets, device):
        self.nets = [net.to(device, memory_format=torch.channels_last) for net in nets]
        self.optimizers = [sgd(net.parameters()) for net in self.nets]

    def step(self, x, y):
        losses = []
        for net, optimizer, x_i, y_i in zip(self.nets, self.optimizers, x, y):
            loss = F.cross_entropy(net(x_i.contiguous(memory_format=torch.channels_last)), y_i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)


WAYS = {"stacked": Stacked, "vmap": Vmapped, "separate": Separate}


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work runs asynchronously: without this the clock reads only queued work
    return time.perf_counter()


def ms_per_step(way, n, args, device):
    """A fresh `way` of n networks (n = 1: the plain network) on random batches: ms per step after the warm-up."""
    nets = make_networks(n, args.width)
    trainer = Separate(nets, device) if n == 1 else WAYS[way](nets, device)
    x = torch.rand(n, args.batch_size, 1, CROP, CROP, device=device)
    y = torch.randint(CLASSES, (n, args.batch_size), device=device)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
        for _ in range(args.warmup):
            trainer.step(x, y)
        start = clock(device)
        for _ in range(args.steps):
            trainer.step(x, y)
    return 1000 * (clock(device) - start) / args.steps


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--members", type=int, nargs="+", default=[1, 2, 4], help="numbers of networks N; 1 is the baseline")
    p.add_argument("--width", type=int, default=8, help="channels of vgg's first stage")
    p.add_argument("--batch-size", type=int, default=64, help="images per member and step")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each (way, N) per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocations, oneDNN or cuDNN plans)")
    p.add_argument("--rounds", type=int, default=5, help="times every (way, N) is measured; min-max and median shown")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as train_emotion.py on a GPU")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    # One thread by default: on a CPU shared with other jobs, several threads wait on each other at every operator
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--small",
        action="store_true",
        help="CI smoke run; flags given explicitly still win. Sets "
        + ", ".join(f"--{k} {v}" for k, v in SMALL.items()),
    )
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.small:  # parse again with the small defaults, so that explicitly given flags still win
        p.set_defaults(**SMALL)
        args = p.parse_args(argv)
    if 1 not in args.members or min(args.members + [args.width, args.batch_size, args.steps, args.rounds]) < 1:
        p.error("--members must include 1 (the baseline); all numbers must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure_and_print(args)
    finally:  # as it was: a caller in the same process (a test) goes on with its own thread count
        torch.set_num_threads(threads)


def measure_and_print(args) -> int:
    device = torch.device(args.device)
    cases = [("plain", 1)] + [(way, n) for n in args.members if n > 1 for way in WAYS]
    times = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            times[case].append(ms_per_step(*case, args, device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(
        f"{name}, torch {torch.__version__}; vgg width {args.width}, batch {args.batch_size} per member, "
        f"{args.steps} steps after {args.warmup}, {args.rounds} rounds{', bf16' if args.bf16 else ''}\n"
    )
    one = statistics.median(times[("plain", 1)])
    print(f"{'way':10s} {'N':>3s} {'ms per step (min-max)':>22s} {'N nets / one':>13s}")
    for (way, n), ms in times.items():
        print(f"{way:10s} {n:3d} {f'{min(ms):.1f}-{max(ms):.1f}':>22s} {statistics.median(ms) / one:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
