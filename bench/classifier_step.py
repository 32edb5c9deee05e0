"""The classifier step, measured: hybrid-parallel vs replicated W, and what one step costs beyond its math.

    .venv/bin/python bench/classifier_step.py layouts            # hybrid vs replicated, P = 2 ranks, a table
    .venv/bin/python bench/classifier_step.py layouts --np 2 --instances 100000 1281167
    .venv/bin/python bench/classifier_step.py overhead           # CPU, P = 2: ms, launches, collectives, syncs
    .venv/bin/python bench/classifier_step.py overhead --backend triton   # launch count of the Triton path
    .venv/bin/python bench/classifier_step.py overhead --np 1 --engine single   # P = 1 without Horovod
    .venv/bin/python bench/classifier_step.py overhead --engine torch   # the workers under torchrun
    python bench/classifier_step.py cuda                          # one GPU, P = 1: B = 128, C = 20,019 and 1,281,167
    TRITON_INTERPRET=1 .venv/bin/python bench/classifier_step.py cuda --dry-run   # the same on the CPU, tiny shapes

layouts: each configuration is its own `horovodrun --gloo -np P` job (so peak RSS is per configuration), its
own `torchrun --nproc_per_node P` job with --engine torch, or its own plain process with --engine single (P = 1).
One step = forward + backward + SGD-momentum update of the classifier from given features [b, D]:
  hybrid:     ShardedInstanceClassifier (each rank C = N/P classes, global batch, packed stats exchange)
  replicated: every rank holds all of W, scores its own batch, and the engine's data-parallel optimizer
              all-reduces dW [N, D] (PIC-style baseline).
Both use the same local kernels (backend flag). Communicated bytes come from model.plan's formulas
(checked against real traffic in tests/test_plan.py).

overhead / cuda: one step = the classifier's forward + backward from given features [b, D] (what the
trainer adds to its backbone step). Launches, collectives and host syncs of one step are counted by
run.step_counter.StepCounter (aten ops + Triton launches: a proxy that runs on any machine); on CUDA
the profiler also counts the GPU kernels that really ran (NCCL's excluded). Time: median over --steps
steps after warm-up, the slower rank; CUDA times with the GPU synchronised after each step. cuda --dry-run runs
the cuda mode's code on the CPU under Triton's interpreter (backend triton, bf16 operands as on a GPU) at tiny
shapes, to check the script where there is no GPU; its times mean nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import peak_memory, provenance, time_ms  # noqa: E402
from run.launch import launch  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("mode", nargs="?", choices=["layouts", "overhead", "cuda"], default="layouts",
                    help="what to measure (default: layouts)")
parser.add_argument("--np", type=int, default=2, help="ranks of the CPU modes (default: 2)")
parser.add_argument("--engine", choices=["horovod", "torch", "single"], default="horovod", help="process group "
                    "of the workers: horovod (a horovodrun job of --np ranks), torch (a torchrun job) or single "
                    "(one plain process, --np 1) (default: horovod; cuda mode: that of its launcher, else single)")
parser.add_argument("--instances", type=int, nargs="+", default=None,
                    help="classifier rows N (default: 10000 100000 1281167 layouts; 10000 overhead; "
                         "20019 1281167 cuda)")
parser.add_argument("--batch-size", type=int, default=None,
                    help="samples PER RANK (default: 128; 64 overhead)")
parser.add_argument("--dim", type=int, default=128, help="feature dim D (default: 128)")
parser.add_argument("--k", type=int, default=5, help="top-K smoothing classes (default: 5)")
parser.add_argument("--steps", type=int, default=None,
                    help="timed steps after the warm-up, median reported (default: 3 layouts, 20 overhead, 100 cuda)")
parser.add_argument("--backend", default="auto", help="kernel backend (default: auto; triton in cuda --dry-run)")
parser.add_argument("--dry-run", action="store_true", help="cuda mode on the CPU under TRITON_INTERPRET=1 at tiny "
                    "shapes (default: off)")
parser.add_argument("--worker", choices=["hybrid", "replicated", "overhead"], help=argparse.SUPPRESS)
parser.add_argument("--result", help=argparse.SUPPRESS)
DEFAULTS = {"layouts": ([10_000, 100_000, 1_281_167], 128, 3), "overhead": ([10_000], 64, 20),
            "cuda": ([20_019, 1_281_167], 128, 100), "cuda-dry-run": ([200, 400], 8, 1)}
DRY_RUN_DIM = 32  # cuda --dry-run: the interpreter's cost grows with D


def start_workers_engine():
    from run.distributed import start
    return start(args.engine, announce=False)


def run_layout_worker(layout, instances):
    from kernels import topk_smoothed_xent
    from model.classifier import ShardedInstanceClassifier
    from model.step import SGD

    world = start_workers_engine()
    generator = torch.Generator().manual_seed(world.rank)
    if layout == "hybrid":
        classifier = ShardedInstanceClassifier(instances, args.dim, smooth_k=args.k, smooth_alpha=0.2,
                                               backend=args.backend)
        optimizer = SGD(classifier.parameters(), lr=0.1, momentum=0.9)
        loss_of = classifier
    else:
        weight = torch.nn.Parameter(torch.randn(instances, args.dim))
        optimizer = world.data_parallel_optimizer(SGD([weight], lr=0.1, momentum=0.9), [("weight", weight)],
                                                  op="average")

        def loss_of(features, ids):
            return topk_smoothed_xent(features, weight, ids, temperature=0.15, k=args.k, alpha=0.2,
                                      backend=args.backend)

    def batch():
        features = torch.randn(args.batch_size, args.dim, generator=generator, requires_grad=True)
        return features, torch.randint(0, instances, (args.batch_size,), generator=generator)

    def step(features, ids):
        optimizer.zero_grad()
        loss_of(features, ids).backward()
        optimizer.step()
    milliseconds = time_ms(step, args.steps, warmup=1, inputs=batch,
                           start=lambda: world.barrier("bench.sync"))  # start the clock together
    peaks = world.allgather(torch.tensor([peak_memory("cpu")]), name="bench.peak_rss").tolist()
    step_ms = world.allreduce(torch.tensor(milliseconds), op="max", name="bench.ms").item()
    if world.rank == 0:
        Path(args.result).write_text(json.dumps({"step_ms": step_ms, "peak_rss_per_rank": peaks}))


def random_batch(instances, device, generator):
    """This rank's features [b, D] (a leaf, as a backbone's output would be) and distinct ids [b]."""
    features = torch.randn(args.batch_size, args.dim, generator=generator).to(device).requires_grad_(True)
    return features, torch.randperm(instances, generator=generator)[:args.batch_size].to(device)


def classifier_step(classifier, features, ids):
    """One forward + backward of the classifier, from fresh gradients (as after optimizer.zero_grad())."""
    classifier.weight.grad = None
    classifier(features, ids).loss.backward()


def time_and_count(classifier, instances, device, synchronize, seed):
    """Wall ms of --steps classifier steps after one warm-up step (each started after `synchronize` and
    ended by it), and a StepCounter of one more step."""
    from run.step_counter import StepCounter

    generator = torch.Generator().manual_seed(seed)
    milliseconds = time_ms(lambda *batch: classifier_step(classifier, *batch), args.steps, warmup=1,
                           inputs=lambda: random_batch(instances, device, generator), start=synchronize,
                           stop=synchronize)
    batch = random_batch(instances, device, generator)
    with StepCounter() as counted:
        classifier_step(classifier, *batch)
    return milliseconds, counted


def run_overhead_worker(instances):
    from model.classifier import ShardedInstanceClassifier

    world = start_workers_engine()
    classifier = ShardedInstanceClassifier(instances, args.dim, smooth_k=args.k, smooth_alpha=0.2, backend=args.backend)
    milliseconds, counted = time_and_count(classifier, instances, torch.device("cpu"), seed=world.rank,
                                           synchronize=lambda: world.barrier("bench.sync"))
    step_ms = world.allreduce(torch.tensor(milliseconds), op="max", name="bench.ms").item()
    if world.rank == 0:
        Path(args.result).write_text(json.dumps({
            "step_ms": step_ms, "launches": len(counted.launches), "collectives": counted.collectives,
            "syncs": counted.syncs}))


def run_worker(worker, instances):
    """The numbers one worker mode measured, from a job of args.np ranks under args.engine."""
    result = Path(tempfile.mkdtemp()) / "result.json"
    # Not --np under torchrun: it would take it for its own --nproc-per-node (argparse abbreviations).
    ranks = [] if args.engine == "torch" else ["--np", str(args.np)]
    env = {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.np))}
    if args.backend == "triton" and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    command, environment = launch(
        args.engine, 1 if args.engine == "single" else args.np, __file__, args.mode, "--worker", worker,
        "--engine", args.engine, *ranks, "--instances", instances, "--batch-size", args.batch_size, "--dim",
        args.dim, "--k", args.k, "--steps", args.steps, "--backend", args.backend, "--result", result, env=env)
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def layouts():
    from model.plan import hybrid_received_bytes, ring_allreduce_received_bytes

    print(provenance())
    print(f"engine {args.engine}, P = {args.np}, batch {args.batch_size}/rank (global {args.np * args.batch_size}), D = {args.dim}, "
          f"K = {args.k}, backend {args.backend}, median of {args.steps} steps")
    print("| N | hybrid ms | replicated ms | speed-up | hybrid MiB recv/step | replicated MiB recv/step "
          "| hybrid peak RSS MiB/rank | replicated peak RSS MiB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for instances in args.instances:
        hybrid, replicated = run_worker("hybrid", instances), run_worker("replicated", instances)
        hybrid_bytes = hybrid_received_bytes(args.np, args.batch_size, args.dim, args.k)
        replicated_bytes = ring_allreduce_received_bytes(args.np, instances * args.dim * 4)
        print(f"| {instances:,} | {hybrid['step_ms']:.1f} | {replicated['step_ms']:.1f} | "
              f"{replicated['step_ms'] / hybrid['step_ms']:.2f}x | {hybrid_bytes / 2**20:.2f} | "
              f"{replicated_bytes / 2**20:.1f} | {max(hybrid['peak_rss_per_rank']) / 2**20:.0f} | "
              f"{max(replicated['peak_rss_per_rank']) / 2**20:.0f} |", flush=True)


def overhead():
    print(provenance())
    print(f"Classifier forward + backward on CPU: engine {args.engine}, P = {args.np}, batch {args.batch_size}/rank, D = {args.dim}, "
          f"K = {args.k}, backend {args.backend}{' (Triton interpreter)' if args.backend == 'triton' else ''}, "
          f"median of {args.steps} steps (slower rank)")
    print("| N | ms/step | launches/step | collectives/step | host syncs/step |")
    print("|---|---|---|---|---|")
    for instances in args.instances:
        result = run_worker("overhead", instances)
        print(f"| {instances:,} | {result['step_ms']:.2f} | {result['launches']} | "
              f"{len(result['collectives'])}: {', '.join(result['collectives'])} | "
              f"{len(result['syncs'])}{': ' + ', '.join(result['syncs']) if result['syncs'] else ''} |", flush=True)


def cuda():
    """P = 1 on one GPU: the classifier step alone at the ImageNet shapes of one rank (--dry-run: on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from model.classifier import ShardedInstanceClassifier

    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("cuda --dry-run runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 (before triton is "
                 "imported)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("cuda mode needs a GPU (the CPU figures come from the overhead mode, or check it with --dry-run)")
    world = start_workers_engine()
    device = world.device
    on_gpu = device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    where = torch.cuda.get_device_name(device) if on_gpu else "CPU (Triton interpreter, dry run: times mean nothing)"
    print(provenance())
    print(f"{where}, engine {world.name}, size {world.size}, "
          f"HOROVOD_CYCLE_TIME={os.environ.get('HOROVOD_CYCLE_TIME')} ms; "
          f"B = {args.batch_size}, D = {args.dim}, K = {args.k}, backend {args.backend}, bf16 kernel operands, "
          f"median of {args.steps} steps")
    print("| C | ms/step | GPU kernels/step (profiler) | launches/step (counter) | collectives/step | host syncs/step |")
    print("|---|---|---|---|---|---|")
    for instances in args.instances:
        # bf16 operands, as the classifier chooses on CUDA: said here so that the dry run rounds the same way.
        classifier = ShardedInstanceClassifier(instances, args.dim, smooth_k=args.k, smooth_alpha=0.2,
                                               backend=args.backend, compute_dtype=torch.bfloat16).to(device)
        milliseconds, counted = time_and_count(classifier, instances, device, synchronize, seed=0)
        batch = random_batch(instances, device, torch.Generator().manual_seed(1))
        synchronize()
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as profiled:
            classifier_step(classifier, *batch)
            synchronize()
        kernels = [event for event in profiled.events() if event.device_type == torch.autograd.DeviceType.CUDA
                   and not any(word in event.name.lower() for word in ("nccl", "memcpy", "memset"))]
        print(f"| {instances:,} | {milliseconds:.3f} | {len(kernels) if on_gpu else '- (no GPU)'} | "
              f"{len(counted.launches)} | {len(counted.collectives)} | {len(counted.syncs)} |", flush=True)
        del classifier  # the next size's rows are allocated after these are freed


if __name__ == "__main__":
    args = parser.parse_args()
    if args.dry_run and args.mode != "cuda":
        sys.exit("error: --dry-run is an option of the cuda mode")
    defaults = DEFAULTS["cuda-dry-run" if args.dry_run else args.mode]
    if args.dry_run:
        args.backend = "triton" if args.backend == "auto" else args.backend
        args.dim = DRY_RUN_DIM if "--dim" not in sys.argv else args.dim
    args.instances = args.instances or defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.steps = args.steps or defaults[2]
    if args.mode == "cuda" and "--engine" not in sys.argv:
        args.engine = "auto"  # the launcher's engine, single without one
    if args.engine == "single" and args.np != 1:
        sys.exit(f"error: --engine single runs one process: give --np 1, not --np {args.np}")
    if args.worker in ("hybrid", "replicated"):
        run_layout_worker(args.worker, args.instances[0])
    elif args.worker == "overhead":
        run_overhead_worker(args.instances[0])
    else:
        {"layouts": layouts, "overhead": overhead, "cuda": cuda}[args.mode]()
