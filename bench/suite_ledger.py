"""The test suite's CPU, process by process: what `make test` spends, and how much of it is processes importing
torch before they do any work.

    python bench/suite_ledger.py                              # pytest -q -n 2 --dist loadfile tests (make test)
    python bench/suite_ledger.py -q -m "not slow" tests       # any other pytest arguments

While the suite runs, every Python process of this interpreter's environment (pytest's workers, each rank of each
job, the launchers and their helpers) appends one line to a ledger as it exits: its own CPU time and whether it
imported torch. A line in a `.pth` file of site-packages does it, inert without the ledger's variable and removed
at the end, so that jobs whose environment names another PYTHONPATH are counted too. A process killed by SIGKILL
writes no line: what the table misses is the total's "not in the ledger" row. And `import torch` alone, in 5
fresh processes before the suite and 5 after, each less an empty interpreter's start: the processes that
imported torch times the median is the import's share of the suite's CPU. Run it with nothing else running.
"""
import collections
import json
import os
import resource
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.harness import ROOT, provenance  # noqa: E402

DEFAULT_PYTEST = ["-q", "-n", "2", "--dist", "loadfile", "tests"]  # the Makefile's test target
IMPORT_SAMPLES = 5  # before the suite, and as many after
# What each process writes as it exits (atexit, and os._exit, which the trainer's ranks use, skips atexit). Once
# per process: Python's start-up runs each line of this venv's .pth files twice.
HOOK = """
import atexit, json, os, resource, sys
if not hasattr(sys, "suite_ledger_hooked"):
    sys.suite_ledger_hooked = True
    atexit.register(lambda: _ledger_line())
    os._exit = lambda status, _exit=os._exit: (_ledger_line(), _exit(status))
def _ledger_line(_path=os.environ["SUITE_LEDGER"]):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line = json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], "cpu": usage.ru_utime + usage.ru_stime,
                       "torch": "torch" in sys.modules})
    with open(_path, "a") as ledger:
        ledger.write(line + "\\n")
"""


def kind(argv):
    """Which part of the suite a process was, from its sys.argv[:2]."""
    first = argv[0] if argv else ""
    name = Path(first).name
    if name == "trainer.py":
        return "trainer.py ranks and runs"
    if "/tests/workers/" in first:
        return "tests/workers/ scripts"
    if "/bench/" in first:
        return "bench/ scripts"
    if name == "run.py" and "torch/distributed" in first:
        return "torchrun agents"
    if "horovod" in first:
        return "horovodrun and its helpers"
    return "pytest, its workers, `python -c`"


def process_cpu(code):
    """CPU-s of `python -c code` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def import_costs():
    """IMPORT_SAMPLES costs of `import torch` alone: a fresh process's CPU-s less an empty one's."""
    return [process_cpu("import torch") - process_cpu("pass") for _ in range(IMPORT_SAMPLES)]


def main():
    arguments = sys.argv[1:] or DEFAULT_PYTEST
    hook_line = Path(site.getsitepackages()[0]) / "zz_suite_ledger.pth"
    with tempfile.TemporaryDirectory() as scratch:
        ledger, hook = Path(scratch) / "ledger.jsonl", Path(scratch) / "hook.py"
        hook.write_text(HOOK)
        costs = import_costs()  # before the suite and after: the VM's speed drifts under a long load
        hook_line.write_text("import os; os.environ.get('SUITE_LEDGER_HOOK') and "
                             "exec(open(os.environ['SUITE_LEDGER_HOOK']).read(), {})\n")
        try:
            start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
            suite = subprocess.run([sys.executable, "-m", "pytest", *arguments], cwd=ROOT,
                                   env={**os.environ, "SUITE_LEDGER": str(ledger), "SUITE_LEDGER_HOOK": str(hook)})
            wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            hook_line.unlink()
        lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    total = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    costs += import_costs()
    cost = statistics.median(costs)
    parts = collections.defaultdict(lambda: [0, 0, 0.0])
    for entry in lines:
        part = parts[kind(entry["argv"])]
        part[0] += 1
        part[1] += entry["torch"]
        part[2] += entry["cpu"]
    print(provenance())
    print(f"pytest {' '.join(arguments)}: exit {suite.returncode}, {wall:.1f} s, {total:.1f} CPU-s\n")
    print("| part of the suite | processes | imported torch | CPU-s |\n|---|---|---|---|")
    for name, (count, torch_count, cpu) in sorted(parts.items(), key=lambda item: -item[1][2]):
        print(f"| {name} | {count} | {torch_count} | {cpu:.1f} |")
    print(f"| not in the ledger | | | {total - sum(part[2] for part in parts.values()):.1f} |")
    importers = sum(part[1] for part in parts.values())
    print(f"\n`import torch` alone: {cost:.2f} CPU-s (median of {len(costs)}, {min(costs):.2f}-{max(costs):.2f}, half "
          f"before the suite, half after; less an empty interpreter's start); "
          f"{importers} processes x {cost:.2f} = {importers * cost:.1f} CPU-s, {100 * importers * cost / total:.0f}% of "
          f"the suite's {total:.1f}; without it {total - importers * cost:.1f} CPU-s, "
          f"{(total - importers * cost) / os.cpu_count():.1f} s on {os.cpu_count()} cores at best")
    sys.exit(suite.returncode)


if __name__ == "__main__":
    main()
