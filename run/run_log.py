"""What a run tells its user: rank 0's console (rich) and `metrics.jsonl` (one JSON object per line).

metrics.jsonl reads as one uninterrupted run: a checkpoint stores how many lines the file had when it was
written, and a resume from it drops the training records after them (they are about to be replayed), keeping
the evaluation records that `linear`/`knn` appended meanwhile. Training records carry an "epoch".

Throughput (`images_per_s` of the training records) is measured over an epoch's steps after its first
WARMUP_STEPS: those include what the first steps of a process or an epoch pay once (Triton and cuDNN
compiles, cuDNN's algorithm search, the new epoch's loader), so a rate from the first step would not be the
step's speed. It is None (null) until a step after the warm-up has ended.
"""
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from run.files import write_text_atomically
from run.layout import METRICS

WARMUP_STEPS = 5  # steps of each epoch left out of its images/s


class RunLog:
    """Rank 0 prints and records; on the other ranks every call is a no-op."""

    def __init__(self, out_dir, active):
        """out_dir: where metrics.jsonl is appended to; None records nothing."""
        self.active, self.console = active, Console(soft_wrap=True)  # long paths stay on one line
        self.metrics = Path(out_dir) / METRICS if active and out_dir is not None else None
        self.lines = len(self._read_lines())  # lines in metrics.jsonl: what a checkpoint remembers

    def print(self, *message):
        if self.active:
            self.console.print(*message)

    def record(self, **values):
        if self.metrics is not None:
            with self.metrics.open("a") as stream:
                stream.write(json.dumps(values) + "\n")
            self.lines += 1

    def rewind(self, lines):
        """Drop the training records after the first `lines` lines (see the module docstring)."""
        kept = self._read_lines()
        if len(kept) <= lines:
            return
        kept = kept[:lines] + [line for line in kept[lines:] if is_evaluation_record(line)]
        write_text_atomically(self.metrics, "".join(kept))  # a crash now leaves the old file or the new one
        self.lines = len(kept)

    def table(self, title, columns, rows):
        """A rich table: the first column left-aligned (names), the others right-aligned (numbers)."""
        table = Table(title=title)
        for position, column in enumerate(columns):
            table.add_column(column, justify="left" if position == 0 else "right")
        for row in rows:
            table.add_row(*row)
        self.print(table)

    def _read_lines(self):
        """The file's lines with their line ends; [] when there is no file (yet) or on ranks other than 0."""
        if self.metrics is None or not self.metrics.is_file():
            return []
        return self.metrics.read_text().splitlines(keepends=True)


def is_evaluation_record(line):
    """True for a complete record without an "epoch" (what `linear` and `knn` append); a line cut short by a
    kill is neither and goes."""
    try:
        return "epoch" not in json.loads(line) and line.endswith("\n")
    except ValueError:
        return False


class Throughput:
    """Images per second over the steps after the first WARMUP_STEPS that this process ran of an epoch (after
    a resume inside an epoch, its first steps are a warm-up again). The clock starts when the last warm-up
    step ends; the step's images are counted when it ends (the trainer reads every step's loss, so a step has
    ended on the device too)."""

    def __init__(self, warmup_steps=WARMUP_STEPS, clock=time.perf_counter):
        self.warmup_steps, self.clock = warmup_steps, clock
        self.steps = self.images = 0
        self.started = clock() if warmup_steps == 0 else None

    def step_ended(self, images):
        """Count one step of `images` images (of all ranks); returns the rate so far, or None in the warm-up."""
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.started = self.clock()
        elif self.steps > self.warmup_steps:
            self.images += images
        return self.rate()

    def rate(self):
        """Images per second of the timed steps, None before the first of them has ended."""
        if self.started is None or not self.images:
            return None
        return self.images / max(self.clock() - self.started, 1e-9)

    @property
    def timed_steps(self):
        return max(self.steps - self.warmup_steps, 0)


def human_bytes(count):
    """A byte count for people: '812 B', '10.5 MiB', '9.54 GiB' (binary units, as `trainer.py plan`)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(count)} B"
