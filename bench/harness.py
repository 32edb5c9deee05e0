"""What every benchmark of bench/ measures with: one timing loop, one peak-memory reader, one provenance line.

    from bench.harness import time_ms, times_ms, reset_peak_memory, peak_memory, provenance

time_ms: the median wall time of a step over `repeats` calls after `warmup` calls that run the same way and are
dropped; times_ms: each timed call's time (a throughput is the total work over their sum, slow calls included).
`start` runs before the clock starts (a barrier: the ranks start together), `stop` before it stops (waiting for
the GPU: its queue, not the host's launches, is the step's end), `inputs` draws each call's arguments off the
clock, and `finish` gets what the step returned once the clock has stopped (to close what the step opened, such
as a loader whose build is timed but not its teardown). On a CUDA `device` the GPU's own events time the step
instead of the host's clock.

Memory, in bytes: on CUDA what torch's allocator holds (allocated tensors); on the CPU the process's resident
set (VmRSS, and its high-water mark VmHWM, which /proc/self/clear_refs resets, Linux >= 4.0).

provenance: one line, "machine ...; GPU ...; date; commit ...; torch X", printed at the head of every result,
so that a number copied into bench/RESULTS.md says where and from what code it came.
"""
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def times_ms(step, repeats, warmup=0, *, start=None, stop=None, inputs=None, finish=None, device=None):
    """The ms of each of `repeats` timed calls of step(*inputs()) after `warmup` untimed ones (see the docstring)."""
    cuda_events = device is not None and torch.device(device).type == "cuda"
    times = []
    for _ in range(warmup + repeats):
        arguments = inputs() if inputs else ()
        if start:
            start()
        if cuda_events:
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
            result = step(*arguments)
            ended.record()
            torch.cuda.synchronize(device)
            times.append(began.elapsed_time(ended))
        else:
            began = time.perf_counter()
            result = step(*arguments)
            if stop:
                stop()
            times.append((time.perf_counter() - began) * 1e3)
        if finish:
            finish(result)
    return times[warmup:]


def time_ms(step, repeats, warmup=0, **hooks):
    """The median of times_ms(step, repeats, warmup, **hooks): a step's time, robust to a busy machine's outliers."""
    return statistics.median(times_ms(step, repeats, warmup, **hooks))


def process_status(field):
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1]) * 1024


def memory_in_use(device):
    """Bytes held now: allocated on CUDA, resident on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    return process_status("VmRSS")


def reset_peak_memory(device):
    """Start the peak counter from now (after the GPU's queue drains); returns memory_in_use(device)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear:  # "5": VmHWM := VmRSS
            clear.write("5")
    return memory_in_use(device)


def peak_memory(device):
    """The most bytes held since the last reset_peak_memory (or the process's start)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return process_status("VmHWM")


def commit():
    """The checked-out commit, marked when tracked files differ from it; unknown outside a git checkout."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (no git checkout)"
    return head + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(*modules):
    """'machine ...; GPU ...; date; commit ...; torch X' and the version of each module given (triton, DALI)."""
    machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    versions = ", ".join(f"{module.__name__} {module.__version__}" for module in (torch, *modules))
    return (f"machine {machine}; GPU {gpu}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
            f"commit {commit()}; {versions}")
