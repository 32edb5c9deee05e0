"""What the instance classifier adds to a training step: the real pretraining step with two kinds of head.

    python bench/train_step.py cpu                                              # tiny shapes, P = 1, seconds
    python bench/train_step.py cpu --engine horovod        # P = 1 through Horovod (a 1-rank job, no launcher)
    horovodrun --gloo -np 2 -H localhost:2 python bench/train_step.py cpu        # the same at P = 2
    torchrun --nproc_per_node 2 bench/train_step.py cpu                          # P = 2, torch.distributed
    python bench/train_step.py gpu            # one GPU: ResNet-50, 224 px, 64 images x 2 views, bf16 autocast
    TRITON_INTERPRET=1 python bench/train_step.py gpu --dry-run   # gpu mode's code on the CPU, tiny shapes

One step is model.step.train_step, exactly what trainer.py runs per step, started as trainer.py starts (the
engine's defaults, threads and device: run.distributed.start), on synthetic input (data.synthetic, no I/O): backbone + projection head on views x images, the head's loss, backward, both SGD-momentum optimizers,
and the read of the loss the trainer does every step. Heads, each built fresh on the same encoder config:
  linear-1000   a 1000-way linear cross-entropy on the projection output (an ImageNet-sized supervised head),
                data-parallel: its gradient is averaged over the ranks with the encoder's;
  instance-N    the sharded instance classifier (model/classifier.py) with N rows in all, N/P per rank,
                K = 5 top-K smoothing; encoder gradients summed over ranks, its shard updated locally.
Reported per head: ms/step (median of --steps after --warmup steps; CUDA synchronised), images/s of the
global batch, the step time relative to linear-1000 ("adds": (t - t_linear) / t_linear) and peak memory from a
clean state: the earlier head's parameters, gradients, buffers and optimizer state are freed (emptied: Horovod's
optimizer hooks would keep them alive) and the peak counter reset before the head is built, so the figure is the
most this head's encoder, criterion, optimizer state and steps held at once above what was left before it (CUDA:
allocated memory; CPU: resident memory, peak reset through /proc/self/clear_refs); "left" is what was there
before it (CUDA: 0 when nothing leaked). gpu --dry-run runs the gpu mode's code (Triton backend, bf16 operands)
on the CPU under Triton's interpreter at tiny shapes, to check the script where there is no GPU; its numbers mean
nothing.
"""
import argparse
import gc
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.harness import peak_memory, provenance, reset_peak_memory, time_ms  # noqa: E402
from data.synthetic import SyntheticLoader  # noqa: E402
from model.classifier import ShardedInstanceClassifier, ShardSGD, distributed_backbone_optimizer  # noqa: E402
from model.encoder import build_encoder  # noqa: E402
from model.step import SGD, train_step  # noqa: E402
from run.distributed import ENGINES, engine, exit_now, start  # noqa: E402

SHAPES = {  # per mode: encoder config, images per rank, views, and the instance-classifier sizes N
    "cpu": dict(arch="resnet18", width=8, small_stem=True, hidden_dim=64, feat_dim=32, image_size=32,
                batch_size=16, views=2, instances=[1_000, 100_000]),
    "gpu": dict(arch="resnet50", width=64, small_stem=False, hidden_dim=2048, feat_dim=128, image_size=224,
                batch_size=64, views=2, instances=[20_019, 1_281_167]),
    "gpu-dry-run": dict(arch="resnet18", width=8, small_stem=True, hidden_dim=32, feat_dim=32, image_size=32,
                        batch_size=8, views=2, instances=[200, 400]),
}
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("mode", choices=["cpu", "gpu"])
parser.add_argument("--instances", type=int, nargs="+", help="classifier rows N in all (default: 1000 100000 "
                    "cpu; 20019 1281167 gpu = one shard of ImageNet at P = 64, and all of it on one GPU)")
parser.add_argument("--steps", type=int, help="timed steps per head (default: 5 cpu, 30 gpu, 1 --dry-run)")
parser.add_argument("--warmup", type=int, help="untimed steps per head first (default: 3; 1 --dry-run)")
parser.add_argument("--dry-run", action="store_true", help="gpu mode on the CPU under TRITON_INTERPRET=1 at tiny "
                    "shapes (default: off)")
parser.add_argument("--engine", choices=ENGINES, default="auto", help="process group, as trainer.py's "
                    "(default: auto: the launcher's engine, else single)")


class Loss(NamedTuple):  # the output train_step takes from a criterion: its loss
    loss: torch.Tensor


class LinearCrossEntropy(torch.nn.Module):
    """The comparison head: cross-entropy of a linear layer over `classes` labels (here id mod classes)."""

    def __init__(self, dim, classes):
        super().__init__()
        self.linear, self.classes = torch.nn.Linear(dim, classes), classes

    def forward(self, features, ids):
        return Loss(torch.nn.functional.cross_entropy(self.linear(features.float()), ids % self.classes))


def build_head(name, rows, shape, backbone, head, device, kernels):
    """(criterion, optimizers) of one head on a fresh encoder, as the trainer builds them; kernels: the instance
    classifier's backend and compute dtype."""
    sgd = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    named = [*backbone.named_parameters(prefix="backbone"), *head.named_parameters(prefix="head")]
    if name == "linear":
        criterion = LinearCrossEntropy(shape["feat_dim"], rows).to(device)
        named += list(criterion.named_parameters(prefix="linear"))
        optimizer = engine().data_parallel_optimizer(SGD([p for _, p in named], **sgd), named,
                                                     op="average")
        return criterion, [optimizer]
    criterion = ShardedInstanceClassifier(rows, shape["feat_dim"], temperature=0.15, smooth_k=5,
                                          smooth_alpha=0.2, **kernels).to(device)
    encoder_optimizer = distributed_backbone_optimizer(SGD([p for _, p in named], **sgd), named)
    return criterion, [encoder_optimizer, ShardSGD(criterion.parameters(), **sgd)]


def release(modules, optimizers):
    """Free the memory of a timed head, whatever still refers to it: Horovod's DistributedOptimizer hooks the
    parameters' gradient accumulators (C++ objects, which the garbage collector cannot see through) with closures
    that hold the optimizer and the parameters, so dropping the names frees nothing. Empty the storage instead:
    the optimizer state (momentum), the gradients, the parameters and buffers."""
    for optimizer in optimizers:
        optimizer.state.clear()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.grad = None
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def clean_state(device):
    """Collect what earlier heads left and reset the peak counter: returns the bytes still allocated (CUDA) or
    resident (CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # what the earlier heads freed is not this head's
    return reset_peak_memory(device)


def time_head(name, rows, shape, args, device, kernels):
    """(median ms/step, peak MiB above the clean state, MiB left before the head) of one head."""
    left = clean_state(device)
    torch.manual_seed(0)
    config = argparse.Namespace(**shape)
    backbone, head = build_encoder(config, device)
    criterion, optimizers = build_head(name, rows, shape, backbone, head, device, kernels)
    world = engine()
    loader = SyntheticLoader(max(rows, world.size * shape["batch_size"]), batch_size=shape["batch_size"],
                             image_size=shape["image_size"], views=shape["views"], rank=world.rank,
                             world_size=world.size, seed=0, device=device)
    views, ids = next(iter(loader))
    step = lambda: train_step(backbone, head, criterion, optimizers, views, ids).loss.item()  # noqa: E731
    milliseconds = time_ms(step, args.steps, args.warmup)  # .item() waits for the step, as the trainer's does
    peak = peak_memory(device) - left
    release((backbone, head, criterion), optimizers)
    # The slowest rank sets the pace of a synchronous step.
    milliseconds = world.allreduce(torch.tensor(milliseconds), op="max", name=f"bench.{name}.{rows}")
    return float(milliseconds), peak / 2**20, left / 2**20


def main():
    args = parser.parse_args()
    if args.dry_run and (args.mode != "gpu" or os.environ.get("TRITON_INTERPRET") != "1"):
        sys.exit("--dry-run runs the gpu mode on the CPU: bench/train_step.py gpu --dry-run under TRITON_INTERPRET=1")
    shape = SHAPES["gpu-dry-run" if args.dry_run else args.mode]
    args.steps = args.steps or (1 if args.dry_run else 5 if args.mode == "cpu" else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    # gpu mode: what the classifier picks on CUDA, said outright so that the dry run runs the same kernels.
    kernels = dict(backend="triton", compute_dtype=torch.bfloat16) if args.mode == "gpu" else {}
    world = start(args.engine)
    device = world.device
    if args.mode == "gpu" and not args.dry_run and device.type != "cuda":
        sys.exit("bench/train_step.py gpu: no CUDA device (or --dry-run under TRITON_INTERPRET=1)")
    if world.rank == 0:
        print(provenance(), flush=True)
    heads = [("linear", 1000), *[("instance", rows) for rows in args.instances or shape["instances"]]]
    results = []
    for name, rows in heads:
        results.append((name, rows, *time_head(name, rows, shape, args, device, kernels)))
        if world.rank == 0:  # one line per head as it ends: a run cut short keeps what it measured
            print(f"{name}-{rows:,}: {results[-1][2]:.1f} ms/step, peak {results[-1][3]:,.0f} MiB", flush=True)
    if world.rank != 0:
        return
    global_images = shape["batch_size"] * world.size
    device_name = (torch.cuda.get_device_name() if device.type == "cuda" else
                   "CPU (Triton interpreter, dry run: numbers mean nothing)" if args.dry_run else "CPU")
    print(f"{device_name}, engine {world.name}, P = {world.size}, {shape['arch']} width {shape['width']} at {shape['image_size']} px, "
          f"{shape['batch_size']} images x {shape['views']} views per rank, D = {shape['feat_dim']}, "
          f"median of {args.steps} steps after {args.warmup}; peak = most held above "
          f"the state before the head ({'allocated' if device.type == 'cuda' else 'resident'}), left = that state")
    print("| head | rows per rank | ms/step | images/s | vs linear-1000 | peak MiB | left MiB |")
    print("|---|---|---|---|---|---|---|")
    linear_ms = results[0][2]
    for name, rows, milliseconds, peak, left in results:
        per_rank = rows if name == "linear" else -(-rows // world.size)
        print(f"| {name}-{rows:,} | {per_rank:,} | {milliseconds:.1f} | {global_images / milliseconds * 1e3:,.0f} | "
              f"{milliseconds / linear_ms:.2f}x ({(milliseconds / linear_ms - 1) * 100:+.0f}%) | {peak:,.0f} | "
              f"{left:,.0f} |")


if __name__ == "__main__":
    main()
    exit_now(0)  # as the trainer ends: no interpreter teardown, which can abort a torchrun worker
