"""bench/harness.py, what every benchmark measures with: the timing loop (warm-up dropped, the hooks around the
clock, the GPU's events on CUDA), the memory readers (the process's resident set on the CPU, torch's allocator on
CUDA through a stand-in) and the provenance line; and bench/suite_ledger.py's account of the suite's processes."""
import ast
import json
import mmap
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import harness, suite_ledger
from tests.conftest import ROOT


@pytest.mark.parametrize("measure, expected", [("times_ms", [3_000, 1_000, 2_000]), ("time_ms", 2_000)])
def test_the_timed_calls_with_the_hooks_around_the_clock_and_their_median(measure, expected, monkeypatch):
    clock, calls = iter(range(0, 1000, 1)), []
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    durations = iter([50, 50, 3, 1, 2])  # seconds per call, as perf_counter counts: two warm-up calls first

    def step(value):
        calls.append(("step", value))
        for _ in range(next(durations) - 1):
            next(clock)
        return f"opened {value}"

    def finish(opened):
        calls.append(("finish", opened))
        for _ in range(100):  # 100 s of teardown, off the clock
            next(clock)
    inputs = iter(range(5))
    milliseconds = getattr(harness, measure)(step, repeats=3, warmup=2, inputs=lambda: (next(inputs),), finish=finish,
                                             start=lambda: calls.append("start"), stop=lambda: calls.append("stop"))
    assert milliseconds == expected  # 3, 1 and 2 s, or their median: the warm-up calls left out
    assert calls == [item for value in range(5)
                     for item in ("start", ("step", value), "stop", ("finish", f"opened {value}"))]


def test_time_ms_on_cuda_times_with_the_gpus_events(monkeypatch):
    recorded = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = len(recorded)
            recorded.append(self)

        def elapsed_time(self, end):
            return 10.0 * (end.at - self.at)
    synchronized = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    steps = []
    finished = []
    milliseconds = harness.time_ms(lambda: steps.append(len(recorded)) or len(steps), repeats=2, warmup=1,
                                   finish=lambda result: finished.append((result, len(recorded))), device="cuda:0")
    assert milliseconds == 10.0 and len(steps) == 3 and steps == [1, 3, 5]  # each step between its two events
    assert finished == [(1, 2), (2, 4), (3, 6)]  # what each step returned, after its end event
    assert synchronized == ["cuda:0"] * 3  # the events are read once the GPU reached the end one


def test_the_cpu_peak_is_the_resident_high_water_mark_since_the_reset():
    before = harness.reset_peak_memory("cpu")
    assert harness.peak_memory("cpu") < before + 16 * 2**20
    # 64 MiB of pages of its own, touched, then given back to the system: from malloc it could come out of the
    # free space of a heap that earlier tests in this process left (it does after a run in the process), where
    # free() keeps it resident.
    block = mmap.mmap(-1, 64 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    block.close()
    assert harness.peak_memory("cpu") >= before + 63 * 2**20 > harness.memory_in_use("cpu")
    assert harness.reset_peak_memory("cpu") == pytest.approx(harness.peak_memory("cpu"), abs=2**20)


def test_on_cuda_memory_is_torchs_allocator_and_the_reset_waits_for_the_gpu(monkeypatch):
    happened = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: happened.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: happened.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 300)
    device = torch.device("cuda", 1)
    assert harness.reset_peak_memory(device) == 100
    assert happened == [("synchronize", device), ("reset", device)]
    assert harness.peak_memory(device) == 300 and harness.memory_in_use(device) == 100


def test_provenance_is_one_line_naming_machine_gpu_date_commit_and_versions(monkeypatch):
    line = harness.provenance(np)
    assert "\n" not in line
    assert re.fullmatch(r"machine .+, \d+ cores, .+; GPU none; \d{4}-\d\d-\d\d \d\d:\d\d \S+; commit [0-9a-f]{4,}"
                        rf"( \(uncommitted changes\))?; torch {re.escape(torch.__version__)}, numpy {np.__version__}",
                        line), line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert "; GPU NVIDIA H100 80GB HBM3; " in harness.provenance()


def test_provenance_outside_a_git_checkout_says_the_commit_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    assert "; commit unknown (no git checkout); " in harness.provenance()


def test_every_name_a_bench_script_imports_from_bench_is_defined_there():
    """The scripts import each other's names (the harness, a study's constants); a name moved or renamed in one
    must not leave another script failing at its first line, which no other test may start."""
    for script in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench."):
                source = ROOT / (node.module.replace(".", "/") + ".py")
                assert source.is_file(), f"{script.relative_to(ROOT)}: no module {node.module}"
                tree = ast.parse(source.read_text())
                defined = {target.id for statement in tree.body if isinstance(statement, ast.Assign)
                           for target in statement.targets if isinstance(target, ast.Name)}
                defined |= {statement.name for statement in tree.body
                            if isinstance(statement, (ast.FunctionDef, ast.ClassDef))}
                missing = [alias.name for alias in node.names if alias.name not in defined]
                assert not missing, f"{script.relative_to(ROOT)}: {node.module} defines no {missing}"


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_the_data_bench_rate_is_the_timed_images_over_their_total_time_and_builds_close_off_the_clock(
        device, monkeypatch):
    """bench/data.py's measure_loader on the harness, with a stand-in loader on a stand-in clock: every third batch
    takes 4 s instead of 1 (a median would hide it), a build costs 2 s and its first batch 1 s, a close 5 s (off
    the clock); on the GPU path each batch is waited for and the GPU's memory read after it."""
    from bench import data as bench
    now, events, synchronized = [0.0], [], []

    class StandInLoader:
        def __init__(self, index, config, epoch, group):
            assert config.dali_device == device and epoch == 0 and group.size == 1
            now[0] += 2
            self.seed = config.seed
            events.append(("built", self.seed))

        def __iter__(self):
            for position in range(3):  # one epoch: 3 batches of 10 images
                now[0] += 4 if position == 2 else 1
                yield [torch.zeros(10, 3, 8, 8)] * 2, torch.arange(10)

        def close(self):
            now[0] += 5
            events.append(("closed", self.seed))

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.close()
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench.time, "process_time", lambda: now[0] / 2)  # CPU seconds: half the wall time
    monkeypatch.setattr(bench, "pretrain_loader", StandInLoader)
    monkeypatch.setattr(bench.InstanceIndex, "load", staticmethod(lambda path: SimpleNamespace(root=path)))
    monkeypatch.setattr(bench, "decoder_arguments", lambda index, device, training: {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(now[0]))
    monkeypatch.setattr(bench, "gpu_bytes_in_use", lambda: 100 + 7 * len(synchronized))
    result = bench.measure_loader("index", 32, device, batch_size=10, threads=2, seconds=6)
    # Batches after the build: 1 warm-up, 3 pilot (1, 4, 1 s: median 1 s, so 6 timed), 6 timed of 1, 4, 1, 1, 4, 1 s.
    assert result["rate"] == 60 / 12 and result["cpu_rate"] == 60 / 6 and result["build"] == 3
    assert events == [("built", 0), ("closed", 0), ("built", 1), ("closed", 1), ("built", 2), ("closed", 2),
                      ("built", 3), ("closed", 3)]
    if device == "gpu":
        assert len(synchronized) == 10 and result["gpu_peak"] == 70 and result["pools"] is not None
    else:
        assert synchronized == [] and result["gpu_peak"] is None and result["pools"] is None


def test_the_suite_ledger_has_a_line_from_every_exit_and_names_the_part_of_each_process(tmp_path):
    hook, ledger = tmp_path / "hook.py", tmp_path / "ledger.jsonl"
    hook.write_text(suite_ledger.HOOK)
    # A normal exit (atexit), os._exit (which skips atexit; the trainer's ranks end so), and one with torch loaded.
    # The hook run twice, as Python's start-up runs a .pth line: still one line a process.
    hooked = f"import os, sys; exec(open({str(hook)!r}).read(), {{}}); exec(open({str(hook)!r}).read(), {{}})"
    for ending in ("pass", "os._exit(3)", "sys.modules['torch'] = sys"):
        subprocess.run([sys.executable, "-c", f"{hooked}; {ending}"],
                       env={**{name: value for name, value in os.environ.items() if name != "SUITE_LEDGER_HOOK"},
                            "SUITE_LEDGER": str(ledger)})  # under suite_ledger.py itself: its own hook off
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(line["argv"], line["torch"]) for line in lines] == [(["-c"], False), (["-c"], False), (["-c"], True)]
    assert len({line["pid"] for line in lines}) == 3 and all(0 < line["cpu"] < 5 for line in lines)
    venv = str(ROOT / ".venv/lib/python3.11/site-packages")
    assert [suite_ledger.kind(argv) for argv in (
        [str(ROOT / "trainer.py"), "--data"], [str(ROOT / "tests/workers/row_norms.py"), "out"],
        [str(ROOT / "bench/kernel.py"), "cpu"], [f"{venv}/torch/distributed/run.py", "--standalone"],
        [str(ROOT / "run/horovodrun.py"), "--gloo"], [f"{venv}/horovod/runner/run_task.py"], ["-c"], [])] == [
        "trainer.py ranks and runs", "tests/workers/ scripts", "bench/ scripts", "torchrun agents",
        "horovodrun and its helpers", "horovodrun and its helpers", "pytest, its workers, `python -c`",
        "pytest, its workers, `python -c`"]
