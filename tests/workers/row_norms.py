"""One rank of model.diagnostics.row_norm_statistics over its shard (model.classifier.shard_rows) of the matrix
tests/test_diagnostics.py: global_rows draws. Usage: row_norms.py NUM_ROWS OUT_JSON; every rank writes its result
to OUT_JSON.RANK."""
import json
import sys

import horovod.torch as hvd

from model.classifier import shard_rows
from model.diagnostics import row_norm_statistics
from tests.test_diagnostics import global_rows

if __name__ == "__main__":
    hvd.init()
    num_rows, out = int(sys.argv[1]), sys.argv[2]
    start, stop = shard_rows(num_rows, hvd.size(), hvd.rank())
    with open(f"{out}.{hvd.rank()}", "w") as stream:
        json.dump(row_norm_statistics(global_rows(num_rows)[start:stop]), stream)
