"""One rank of run.diagnostics.row_norm_statistics over its shard (run.distributed.shard_rows) of each matrix
tests/test_diagnostics.py: global_rows draws. Usage: row_norms.py OUT_FOLDER NUM_ROWS...; every rank writes its
result for NUM_ROWS rows to OUT_FOLDER/rows-NUM_ROWS.rank-RANK.json."""
import json
import sys
from pathlib import Path

from run.distributed import shard_rows, start
from run.diagnostics import row_norm_statistics
from tests.test_diagnostics import global_rows

if __name__ == "__main__":
    world = start(announce=False)
    out = Path(sys.argv[1])
    for num_rows in map(int, sys.argv[2:]):
        start, stop = shard_rows(num_rows, world.size, world.rank)
        result = row_norm_statistics(global_rows(num_rows)[start:stop])
        (out / f"rows-{num_rows}.rank-{world.rank}.json").write_text(json.dumps(result))
