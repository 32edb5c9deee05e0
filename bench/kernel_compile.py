"""Every Triton kernel of kernels/ compiled for H100 (sm_90) and A100 (sm_80) as the JIT compiles it at the
launches the trainer and the kernels' API make, on any machine: no GPU and no driver (Triton ships ptxas).

Triton compiles a kernel per specialisation of its arguments (triton.runtime.jit.JITFunction.run): pointers
16-byte aligned and integers divisible by 16 get `tt.divisibility`, integers equal to 1 become constants, and
each specialisation has its own registers, spills and shared memory. So this runs the project's own code on
CPU tensors of the real shapes and layouts with every launch recorded instead of run, then hands each recorded
launch to JITFunction.run itself as a warm-up (compile, do not launch) under a stand-in driver whose current
device is the target: the binder, the specialisation and triton.compile are Triton's own, through its cache
(a warm run costs seconds). Registers and spills come from the cubin (`cuobjdump --dump-resource-usage`);
spills are its stack frame per thread (ptxas's "bytes stack frame": the kernels have no local arrays, so the
frame holds spilled registers only).

Launch cases: LAYOUTS x SHAPES, D = 128, K = 5, one forward + backward of the loss and one seeding each:
  trainer      model.classifier.ShardedInstanceClassifier as the trainer runs it on CUDA (bf16 features from
               the autocast head, fp32 rows, bf16 products, Triton backend), as rank P - 1 of P ranks through a
               stand-in process group: the normalized features are fp32 views of the exchange block
  bf16, fp32   the shard-level API (kernels.sharded_topk_xent, kernels.seed_rows_) on contiguous tensors of
               that dtype, products in that dtype
The launchers size their class splits by the device's multiprocessors: the capture gives them the target's.
CPU tensors are allocated as on a GPU (fresh allocations, 64-byte aligned or more on both, and views of
them), so pointers and strides specialise as there. Nothing runs: the launchers' outputs are empty tensors
whose memory is never touched, and no [B, C] buffer exists (the largest tensor is a shard, C x D).

check() fails on a kernel of kernels/ that no case launches, a compile error, shared memory over the target's
per-block limit, and spills on sm_90; `python bench/kernel.py compile` prints the table and exits 1 on a
failure (tests/test_kernels_compile.py runs it).
"""
import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench.harness import peak_memory
from kernels import exchange, seed_rows_, sharded_topk_xent, triton_exchange, triton_seed, triton_topk_xent
from kernels.reference import normalize_rows
from model.classifier import ShardedInstanceClassifier

DIM, K, ALPHA, TEMPERATURE = 128, 5, 0.2, 0.15
SHAPES = ((512, 20_000), (4096, 160_000))  # (global batch B, classes C of one shard)
# Ranks of the trainer's layout at each shape: a one-GPU run at the small shard, an 8-GPU node at ImageNet's.
TRAINER_RANKS = {512: 1, 4096: 8}
KERNEL_MODULES = (triton_topk_xent, triton_exchange, triton_seed)


@dataclass(frozen=True)
class Target:
    """A GPU to compile for, and what the check holds its kernels to."""
    name: str
    capability: int
    multiprocessors: int  # the loss launchers split the classes by it
    shared_limit: int  # bytes of shared memory a block may opt in to
    spills_fail: bool  # spills fail the check (else they are reported)


TARGETS = (Target("sm_90", 90, 132, 227 * 1024, spills_fail=True),  # H100 SXM
           Target("sm_80", 80, 108, 163 * 1024, spills_fail=False))  # A100


@dataclass
class Compiled:
    """One kernel compiled for one target (one specialisation), and the launch cases that make it."""
    kernel: str
    target: Target
    cases: list = field(default_factory=list)
    warps: int = 0
    stages: int = 0
    shared: int = 0
    registers: int = 0
    spills: int = 0  # bytes of stack frame per thread
    error: str = ""

    def failures(self):
        """Why this fails the check ([] when it passes)."""
        reasons = [f"does not compile: {self.error}"] if self.error else []
        if self.shared > self.target.shared_limit:
            reasons.append(f"{self.shared} B of shared memory, over the {self.target.shared_limit} B a block may have")
        if self.spills and self.target.spills_fail:
            reasons.append(f"spills {self.spills} B per thread")
        return reasons


# ---------------------------------------------------------------------------------------------
# Capture: the project's own launches on CPU tensors, recorded instead of run.

@contextlib.contextmanager
def recorded_launches(multiprocessors):
    """Inside: every Triton launch appends (kernel, args, kwargs) to the yielded list and runs nothing; the
    loss launchers see a GPU of `multiprocessors` SMs."""
    from triton.runtime.jit import JITFunction
    launches = []
    run, processors = JITFunction.run, triton_topk_xent._multiprocessors
    JITFunction.run = lambda kernel, *args, grid, warmup, **kwargs: launches.append((kernel, args, kwargs))
    triton_topk_xent._multiprocessors = lambda device: multiprocessors
    try:
        yield launches
    finally:
        JITFunction.run, triton_topk_xent._multiprocessors = run, processors


class _RankOfGroup:
    """Rank `rank` of `size` ranks, as model.classifier uses its process group: the features exchange returns the
    global batch packed as every rank packs its part (`exchanged`, set by the caller); the other collectives
    return fresh blocks of the right shape, which nothing reads."""

    def __init__(self, size, rank):
        self.size, self.rank, self.exchanged = size, rank, None

    def alltoall(self, tensor, splits, name=None, received=None):
        if received is None:  # the features exchange
            features, ids = self.exchanged
            return exchange.pack_features(features, ids, 1)[0], torch.tensor(splits)
        return torch.empty(sum(received), tensor.shape[1], dtype=tensor.dtype), None  # its backward

    def allgather(self, tensor, name=None, same_shape=False):
        return torch.empty(self.size * len(tensor), *tensor.shape[1:], dtype=tensor.dtype)


def _trainer_step_and_seeding(batch, classes):
    """One training step and one seeding of model.classifier as the trainer runs them on CUDA, at rank P - 1."""
    ranks = TRAINER_RANKS[batch]
    group = _RankOfGroup(ranks, ranks - 1)
    classifier = ShardedInstanceClassifier(ranks * classes, DIM, temperature=TEMPERATURE, smooth_k=K,
                                           smooth_alpha=ALPHA, backend="triton", compute_dtype=torch.bfloat16,
                                           group=group)
    # Each rank: two views of batch / ranks / 2 images (model.step), ids spread over all shards; rank-major.
    images = torch.randperm(ranks * classes)[:batch // 2].view(ranks, -1)
    features = torch.randn(batch, DIM).to(torch.bfloat16).view(ranks, -1, DIM)  # the head's output under autocast
    group.exchanged = (features.flatten(0, 1), images.repeat(1, 2).flatten())
    classifier(features[-1].clone().requires_grad_(True), images[-1].repeat(2)).loss.backward()
    # Raw-feature init seeds from one view of the images.
    seeding = features[:, :images.shape[1]]
    group.exchanged = (seeding.flatten(0, 1), images.flatten())
    classifier.seed_(seeding[-1].clone(), images[-1])


def _shard_api_step_and_seeding(batch, classes, dtype):
    """kernels.sharded_topk_xent forward + backward and kernels.seed_rows_ on contiguous tensors of `dtype`."""
    features_n = normalize_rows(torch.randn(batch, DIM)).to(dtype).requires_grad_(True)
    weight = torch.empty(classes, DIM, dtype=dtype).requires_grad_(True)  # read by no kernel here
    labels = torch.randint(0, classes, (batch,))
    loss, _ = sharded_topk_xent(features_n, weight, labels, 0, classes, temperature=TEMPERATURE, k=K, alpha=ALPHA,
                                backend="triton")
    loss.backward()
    seed_rows_(weight.detach(), features_n.detach(), labels, 0, backend="triton")


LAYOUTS = {"trainer": _trainer_step_and_seeding,
           "bf16": lambda batch, classes: _shard_api_step_and_seeding(batch, classes, torch.bfloat16),
           "fp32": lambda batch, classes: _shard_api_step_and_seeding(batch, classes, torch.float32)}


def capture(layout, batch, classes, multiprocessors):
    """The launches (kernel, args, kwargs) of one layout at one shape, in order."""
    torch.manual_seed(0)
    with recorded_launches(multiprocessors) as launches:
        LAYOUTS[layout](batch, classes)
    return launches


# ---------------------------------------------------------------------------------------------
# Compile: JITFunction.run's own warm-up with the target as the current device.

class _TargetDriver:
    """What JITFunction.run asks of Triton's driver, for a target without its GPU: the target's number as the
    current device (so each target has its own JIT cache) and the target itself."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device):
        return None

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compiling_for(capability):
    """Inside: Triton's JIT compiles for GPUTarget('cuda', capability, 32)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    previous = driver._active
    driver.set_active(_TargetDriver(GPUTarget("cuda", capability, 32)))
    try:
        yield
    finally:
        driver.set_active(previous)


def resource_usage(cubin):
    """{REG, STACK, SHARED, LOCAL, ...} of the one kernel of a cubin, from `cuobjdump --dump-resource-usage`."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], check=True,
                              capture_output=True, text=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (item.split(":", 1) for item in line.split()) if value.isdigit()}


def compile_for(target, launches_by_case):
    """[Compiled] of every distinct specialisation among the launches {case: [launch]}, for target."""
    compiled = {}
    with compiling_for(target.capability):
        for case, launches in launches_by_case.items():
            for kernel, args, kwargs in launches:
                try:
                    binary = kernel.run(*args, grid=(1,), warmup=True, **kwargs)
                    key, error = binary.hash, ""
                except Exception as exception:  # reported in the table, and the check fails
                    binary, error = None, f"{type(exception).__name__}: {(str(exception).splitlines() or [''])[0]}"
                    key = error
                entry = compiled.get((kernel.__name__, key))
                if entry is None:
                    entry = compiled[(kernel.__name__, key)] = Compiled(kernel.__name__, target, error=error)
                    if binary is not None:
                        usage = resource_usage(binary.asm["cubin"])
                        entry.warps, entry.stages = binary.metadata.num_warps, binary.metadata.num_stages
                        entry.shared, entry.registers, entry.spills = binary.metadata.shared, usage["REG"], usage["STACK"]
                if case not in entry.cases:
                    entry.cases.append(case)
    return list(compiled.values())


def project_kernels():
    """Names of the Triton kernels of kernels/ (the JIT functions named *_kernel; the others are helpers)."""
    from triton.runtime.jit import KernelInterface
    return {name for module in KERNEL_MODULES for name, value in vars(module).items()
            if isinstance(value, KernelInterface) and name.endswith("_kernel")}


def check(targets=TARGETS, shapes=SHAPES):
    """[Compiled] of every launch case, for every target."""
    entries = []
    for target in targets:
        launches_by_case = {f"{layout} {batch}x{classes // 1000}k": capture(layout, batch, classes,
                                                                            target.multiprocessors)
                            for layout in LAYOUTS for batch, classes in shapes}
        entries += compile_for(target, launches_by_case)
    return entries


def failures(entries, targets=TARGETS):
    """One line per reason the check fails: each compiled kernel's, and each kernel of kernels/ that no case
    launched for a target."""
    failed = [f"{entry.kernel} on {entry.target.name}: {reason}" for entry in entries for reason in entry.failures()]
    for target in targets:
        missing = project_kernels() - {entry.kernel for entry in entries if entry.target == target}
        failed += [f"{name} on {target.name}: launched by no case" for name in sorted(missing)]
    return failed


def table(entries):
    """The report: one Markdown row per compiled specialisation, grouped by target and kernel."""
    order = {name: index for index, name in enumerate(dict.fromkeys(entry.kernel for entry in entries))}
    lines = ["| kernel | target | warps | stages | shared (bytes) | registers | spills (bytes/thread) | launch cases | "
             "check |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in sorted(entries, key=lambda entry: (-entry.target.capability, order[entry.kernel])):
        verdict = "; ".join(entry.failures()) or "ok"
        lines.append(f"| {entry.kernel} | {entry.target.name} | {entry.warps} | {entry.stages} | {entry.shared} | "
                     f"{entry.registers} | {entry.spills} | {', '.join(entry.cases)} | {verdict} |")
    return "\n".join(lines)


def main():
    """Print the table; exit status 1 if the check fails."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile mode needs the real Triton compiler: unset TRITON_INTERPRET")
    import triton
    begin = time.perf_counter()
    entries = check()
    failed = failures(entries)
    limits = ", ".join(f"{target.name} {target.shared_limit:,} B" for target in TARGETS)
    peak_mib = peak_memory("cpu") / 2**20
    print(f"Triton {triton.__version__}: {len(entries)} compiled kernels at D = {DIM}, K = {K} in "
          f"{time.perf_counter() - begin:.0f} s, peak memory {peak_mib:.0f} MiB; shared memory per block at most "
          f"{limits}; spills fail on {', '.join(target.name for target in TARGETS if target.spills_fail)}")
    print(table(entries))
    if failed:
        raise SystemExit("compile check FAILED:\n" + "\n".join(failed))
