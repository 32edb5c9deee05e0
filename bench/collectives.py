"""What one collective of the classifier step costs under an engine: the three exchanges at their sizes, and
the per-step stop-signal check.

    horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python bench/collectives.py
    .venv/bin/torchrun --nproc_per_node 2 bench/collectives.py        # NCCL on GPUs, gloo on CPUs

Each row is one collective of a step at batch --batch-size per rank, D = --dim, K = --k (model/classifier.py):
  alltoall classifier.features        P copies of [b, D + 1] fp32 (the normalized features and their ids);
  allgather classifier.stats          [B, 2 + 2K] fp32, B = P b (every rank's per-sample statistics);
  alltoall classifier.grad_features   [B, D] fp32 back to the owners (each rank receives b rows from each);
  allreduce faults.stop_signal        one int32 on the host (the agreed stop, after every step).
The exchanges' tensors lie on the rank's device (its GPU under CUDA, as in the trainer; --host-tensors: the CPU).
Time: median over --repeats after --warmup, the slower rank, every repeat started after a barrier and, on a GPU,
ended when the device is done.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.harness import provenance, time_ms  # noqa: E402
from run.distributed import ENGINES, exit_now, start  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batch-size", type=int, default=64, help="samples PER RANK (default: 64)")
parser.add_argument("--dim", type=int, default=128, help="feature dim D (default: 128)")
parser.add_argument("--k", type=int, default=5, help="top-K smoothing classes (default: 5)")
parser.add_argument("--repeats", type=int, default=200, help="timed repeats per collective (default: 200)")
parser.add_argument("--warmup", type=int, default=20, help="untimed repeats first (default: 20)")
parser.add_argument("--engine", choices=ENGINES, default="auto", help="(default: auto: the launcher's)")
parser.add_argument("--host-tensors", action="store_true", help="the exchanges' tensors on the CPU, also where "
                    "the ranks have GPUs (default: on the rank's device)")


def main():
    args = parser.parse_args()
    world = start(args.engine)
    size, batch = world.size, args.batch_size
    device = torch.device("cpu") if args.host_tensors else world.device
    features = torch.randn(size * batch, args.dim + 1, device=device)
    stats = torch.randn(size * batch, 2 + 2 * args.k, device=device)
    grad = torch.randn(size * batch, args.dim, device=device)
    finished = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = {
        "alltoall classifier.features": lambda: world.alltoall(features, splits=[batch] * size,
                                                               name="classifier.features"),
        "allgather classifier.stats": lambda: world.allgather(stats, name="classifier.stats", same_shape=True),
        "alltoall classifier.grad_features": lambda: world.alltoall(grad, splits=[batch] * size,
                                                                    name="classifier.grad_features",
                                                                    received=[batch] * size),
        "allreduce faults.stop_signal": lambda: world.allreduce(torch.zeros(1, dtype=torch.int32), op="max",
                                                                name="faults.stop_signal"),
    }
    rows = []
    for name, collective in cases.items():
        milliseconds = time_ms(collective, args.repeats, args.warmup, start=lambda: world.barrier("bench.collectives"),
                               stop=finished)
        median = world.allreduce(torch.tensor(milliseconds), op="max", name="bench.ms")
        rows.append((name, float(median)))
    if world.rank == 0:
        print(provenance())
        print(f"engine {world.name}, P = {size}, tensors on {device.type}, batch {batch}/rank, D = {args.dim}, "
              f"K = {args.k}, median of {args.repeats} (slower rank)")
        print("| collective | ms |")
        print("|---|---|")
        for name, milliseconds in rows:
            print(f"| {name} | {milliseconds:.3f} |")


if __name__ == "__main__":
    main()
    exit_now(0)  # as the trainer ends: no interpreter teardown, which can abort a torchrun worker
