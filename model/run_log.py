"""What a run tells its user: rank 0's console (rich) and `metrics.jsonl` (one JSON object per line)."""
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


class RunLog:
    """Rank 0 prints and records; on the other ranks every call is a no-op."""

    def __init__(self, out_dir, active):
        """out_dir: where metrics.jsonl is appended to; None records nothing."""
        self.active, self.console = active, Console(soft_wrap=True)  # long paths stay on one line
        self.metrics = Path(out_dir) / "metrics.jsonl" if active and out_dir is not None else None

    def print(self, *message):
        if self.active:
            self.console.print(*message)

    def record(self, **values):
        if self.metrics is not None:
            with self.metrics.open("a") as stream:
                stream.write(json.dumps(values) + "\n")

    def table(self, title, columns, rows):
        """A rich table: the first column left-aligned (names), the others right-aligned (numbers)."""
        table = Table(title=title)
        for position, column in enumerate(columns):
            table.add_column(column, justify="left" if position == 0 else "right")
        for row in rows:
            table.add_row(*row)
        self.print(table)
