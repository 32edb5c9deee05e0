"""Every Triton kernel a training step launches, compiled and run once at a small shape and checked against
its torch twin: the first seconds of a GPU session, so that a kernel that does not compile with that
machine's Triton is named before anything that needs it runs.

    python bench/gpu/triton_smoke.py                                # on CUDA
    TRITON_INTERPRET=1 python bench/gpu/triton_smoke.py --dry-run   # the same on the CPU, Triton's interpreter

What runs is the trainer's classifier step on one rank (single engine): model.classifier's forward +
backward with backend "triton" (the loss kernels of kernels/triton_topk_xent.py and the glue of
kernels/triton_exchange.py: features packing, split merge, shard merge, features backward), then its
raw-feature seeding (kernels/triton_seed.py), at the trainer's operand dtypes on a GPU: fp32 features and
fp32 rows, rounded to bf16 for the products inside the kernels. The twin is the same classifier with the
chunked torch backend (seeding: the torch reference) on the same inputs. Checked: the loss (relative error),
dE and dW (norm-wise relative error), the merged top-K ids, the seeded rows, and that every `*_kernel` of those
three modules was launched (kernels.launches counts the launches), so that a kernel added to the step cannot be
left out of this check. Prints one markdown table; exits 1 when a check fails.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
import triton  # noqa: E402
import triton.runtime.jit  # noqa: E402

from kernels import triton_exchange, triton_seed, triton_topk_xent  # noqa: E402
from kernels.launches import LaunchCounter  # noqa: E402
from model.classifier import ShardedInstanceClassifier  # noqa: E402
from run.distributed import start  # noqa: E402

# batch (the global one), classes, dim, K: one bf16 tile per kernel on a GPU, and several class splits so the
# split merge has work; D = 128 and K = 5 as in the trainer's ImageNet setting.
SHAPE = dict(batch=96, classes=1000, dim=128, k=5)
DRY_RUN_SHAPE = dict(batch=24, classes=300, dim=32, k=5)  # the interpreter runs programs one after another
TRITON_MODULES = (triton_topk_xent, triton_exchange, triton_seed)
# Both sides round the same operands to bf16 and accumulate in fp32: what differs is the order of the sums and,
# on a GPU, the bf16 rounding of G's two parts before the backward products (kernels/triton_topk_xent.py).
# Generous next to those (bench/gpu/gpu_check.sh holds the kernels to the float64 oracle); garbage is far outside.
TOLERANCE = {"loss": 1e-4, "dE": 2e-2, "dW": 2e-2, "seeded rows": 1e-6}
MAX_ROWS_WITH_OTHER_IDS = 1  # a near-tie of two logits across the K-th place may swap one row's last pick

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dry-run", action="store_true", help="run on the CPU under TRITON_INTERPRET=1 at a smaller "
                    "shape (default: off, needs CUDA)")


def step_kernels():
    """Names of the Triton kernels (the launched `*_kernel` functions, not their @triton.jit helpers)."""
    return sorted(name for module in TRITON_MODULES for name, value in vars(module).items()
                  if isinstance(value, triton.runtime.jit.KernelInterface) and name.endswith("_kernel"))


def classifier_step(backend, weight, features, ids, k):
    """(loss, dE, dW, merged top-K ids, seeded weight) of one forward + backward and one seeding."""
    classifier = ShardedInstanceClassifier(len(weight), weight.shape[1], temperature=0.15, smooth_k=k,
                                           smooth_alpha=0.2, backend=backend, compute_dtype=torch.bfloat16)
    classifier = classifier.to(weight.device)
    classifier.weight.data.copy_(weight)
    features = features.clone().requires_grad_(True)
    classified = classifier(features, ids)
    classified.loss.backward()
    hardest = classified.hardest.clone()
    classifier.seed_(features.detach(), ids)
    return classified.loss.detach(), features.grad, classifier.weight.grad, hardest, classifier.weight.detach()


def relative(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def main():
    args = parser.parse_args()
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry-run runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 (before triton is imported)")
    world = start("single")
    device = world.device
    if not args.dry_run and device.type != "cuda":
        sys.exit("bench/gpu/triton_smoke.py: no CUDA device (or --dry-run under TRITON_INTERPRET=1)")
    shape = DRY_RUN_SHAPE if args.dry_run else SHAPE
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"Triton smoke test on {where}: triton {triton.__version__}, torch {torch.__version__}; "
          f"B = {shape['batch']}, C = {shape['classes']:,}, D = {shape['dim']}, K = {shape['k']}; "
          "fp32 features and rows, bf16 products")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape["classes"], shape["dim"], generator=generator).to(device)
    features = torch.randn(shape["batch"], shape["dim"], generator=generator).to(device)
    ids = torch.randperm(shape["classes"], generator=generator)[:shape["batch"]].to(device)

    began = time.perf_counter()
    with LaunchCounter() as counted:
        ours = classifier_step("triton", weight, features, ids, shape["k"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    twin = classifier_step("chunked", weight, features, ids, shape["k"])
    # [B, K]: the same SET of ids per row (the loss depends on the set; the order can swap at a near-tie)
    rows_with_other_ids = int((ours[3].sort(dim=1).values != twin[3].sort(dim=1).values).any(dim=1).sum())
    launched = sorted({name.removeprefix("triton ") for name in counted.launches if name.startswith("triton ")})
    missing = sorted(set(step_kernels()) - set(launched))

    rows = [(name, relative(a, b), TOLERANCE[name]) for name, a, b in
            (("loss", ours[0], twin[0]), ("dE", ours[1], twin[1]), ("dW", ours[2], twin[2]))]
    rows.append(("seeded rows", float((ours[4] - twin[4]).abs().max()), TOLERANCE["seeded rows"]))
    failed = [name for name, error, tolerance in rows if not error <= tolerance]
    print("| check | Triton vs torch twin | tolerance | ok |")
    print("|---|---|---|---|")
    for name, error, tolerance in rows:
        kind = "max abs error" if name == "seeded rows" else "relative error"
        print(f"| {name} | {kind} {error:.1e} | {tolerance:.0e} | {'no' if name in failed else 'yes'} |")
    ids_ok = rows_with_other_ids <= MAX_ROWS_WITH_OTHER_IDS
    print(f"| top-K ids | {rows_with_other_ids} of {shape['batch']} rows with another set | "
          f"<= {MAX_ROWS_WITH_OTHER_IDS} | {'yes' if ids_ok else 'no'} |")
    print(f"| kernels launched | {len(launched)} of {len(step_kernels())}"
          f"{': missing ' + ', '.join(missing) if missing else ''} | all | {'no' if missing else 'yes'} |")
    triton_launches = sum(name.startswith("triton ") for name in counted.launches)
    print(f"\nlaunched: {', '.join(launched)}; {triton_launches} Triton launches, compile + first run {seconds:.1f} s")
    if failed or missing or not ids_ok:
        sys.exit("Triton smoke test FAILED: " + ", ".join(failed + (["top-K ids"] if not ids_ok else [])
                                                        + (["kernels not launched"] if missing else [])))


if __name__ == "__main__":
    main()
