"""One rank of run.diagnostics.row_norm_statistics over its shard (run.distributed.shard_rows) of the matrix
tests/test_diagnostics.py: global_rows draws. Usage: row_norms.py NUM_ROWS OUT_JSON; every rank writes its result
to OUT_JSON.RANK."""
import json
import sys

from run.distributed import shard_rows, start
from run.diagnostics import row_norm_statistics
from tests.test_diagnostics import global_rows

if __name__ == "__main__":
    world = start(announce=False)
    num_rows, out = int(sys.argv[1]), sys.argv[2]
    start, stop = shard_rows(num_rows, world.size, world.rank)
    with open(f"{out}.{world.rank}", "w") as stream:
        json.dump(row_norm_statistics(global_rows(num_rows)[start:stop]), stream)
