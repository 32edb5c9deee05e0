"""The paper's point, measured: one classifier step, hybrid-parallel (sharded W) vs replicated W.

    .venv/bin/python bench/classifier_step.py            # runs every configuration, prints a table
    .venv/bin/python bench/classifier_step.py --np 2 --instances 100000 1281167

Each configuration is its own `horovodrun --gloo -np P` job (so peak RSS is per configuration).
One step = forward + backward + SGD-momentum update of the classifier from given features [b, D]:
  hybrid:     ShardedInstanceClassifier (each rank C = N/P rows, global batch, packed stats exchange)
  replicated: every rank holds all of W, scores its own batch, and hvd.DistributedOptimizer
              all-reduces dW [N, D] (PIC-style baseline).
Both use the same local kernels (backend flag). Communicated bytes come from model.plan's formulas
(checked against real traffic in tests/test_plan.py).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--np", type=int, default=2, help="Horovod ranks (default: 2)")
parser.add_argument("--instances", type=int, nargs="+", default=[10_000, 100_000, 1_281_167],
                    help="classifier rows N (default: 10000 100000 1281167)")
parser.add_argument("--batch-size", type=int, default=128, help="samples PER RANK (default: 128)")
parser.add_argument("--dim", type=int, default=128, help="feature dim D (default: 128)")
parser.add_argument("--k", type=int, default=5, help="top-K smoothing classes (default: 5)")
parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default: 3)")
parser.add_argument("--backend", default="auto", help="kernel backend (default: auto)")
parser.add_argument("--worker", choices=["hybrid", "replicated"], help=argparse.SUPPRESS)
parser.add_argument("--result", help=argparse.SUPPRESS)
args = parser.parse_args()


def run_worker(layout, instances):
    import horovod.torch as hvd
    from kernels import topk_smoothed_xent
    from model.classifier import ShardedInstanceClassifier

    hvd.init()
    generator = torch.Generator().manual_seed(hvd.rank())
    if layout == "hybrid":
        classifier = ShardedInstanceClassifier(instances, args.dim, smooth_k=args.k, smooth_alpha=0.2,
                                               backend=args.backend)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
        loss_of = classifier
    else:
        weight = torch.nn.Parameter(torch.randn(instances, args.dim))
        optimizer = hvd.DistributedOptimizer(torch.optim.SGD([weight], lr=0.1, momentum=0.9),
                                             named_parameters=[("weight", weight)])

        def loss_of(features, ids):
            return topk_smoothed_xent(features, weight, ids, temperature=0.15, k=args.k, alpha=0.2,
                                      backend=args.backend)
    times = []
    for step in range(args.steps + 1):
        features = torch.randn(args.batch_size, args.dim, generator=generator, requires_grad=True)
        ids = torch.randint(0, instances, (args.batch_size,), generator=generator)
        hvd.allreduce(torch.zeros(1), name=f"sync{step}")  # start the clock together
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_of(features, ids).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = hvd.allgather(torch.tensor([peak_rss])).tolist()
    step_ms = hvd.allreduce(torch.tensor(sorted(times[1:])[len(times[1:]) // 2] * 1e3), op=hvd.Max).item()
    if hvd.rank() == 0:
        Path(args.result).write_text(json.dumps({"step_ms": step_ms, "peak_rss_per_rank": peaks}))


def launch(layout, instances):
    result = Path(tempfile.mkdtemp()) / "result.json"
    command = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", str(args.np),
               "-H", f"localhost:{args.np}", sys.executable, __file__, "--worker", layout,
               "--np", str(args.np), "--instances", str(instances), "--batch-size", str(args.batch_size),
               "--dim", str(args.dim), "--k", str(args.k), "--steps", str(args.steps), "--backend", args.backend, "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.np))}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main():
    from model.plan import hybrid_received_bytes, ring_allreduce_received_bytes

    print(f"P = {args.np}, batch {args.batch_size}/rank (global {args.np * args.batch_size}), D = {args.dim}, "
          f"K = {args.k}, backend {args.backend}, median of {args.steps} steps")
    print("| N | hybrid ms | replicated ms | speed-up | hybrid MiB recv/step | replicated MiB recv/step "
          "| hybrid peak RSS MiB/rank | replicated peak RSS MiB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for instances in args.instances:
        hybrid, replicated = launch("hybrid", instances), launch("replicated", instances)
        hybrid_bytes = hybrid_received_bytes(args.np, args.batch_size, args.dim, args.k)
        replicated_bytes = ring_allreduce_received_bytes(args.np, instances * args.dim * 4)
        print(f"| {instances:,} | {hybrid['step_ms']:.1f} | {replicated['step_ms']:.1f} | "
              f"{replicated['step_ms'] / hybrid['step_ms']:.2f}x | {hybrid_bytes / 2**20:.2f} | "
              f"{replicated_bytes / 2**20:.1f} | {max(hybrid['peak_rss_per_rank']) / 2**20:.0f} | "
              f"{max(replicated['peak_rss_per_rank']) / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    run_worker(args.worker, args.instances[0]) if args.worker else main()
