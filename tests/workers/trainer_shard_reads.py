"""The files each rank opens to read its classifier rows back from a checkpoint, as a resume does (argv:
checkpoint, output folder): rank R writes rankR.json {opened, rows}."""
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from run.checkpoint import load_rows, load_state
from run.distributed import shard_rows

hvd.init()
checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_state(checkpoint)
num_instances = state["config"]["num_instances"]
start, stop = shard_rows(num_instances, hvd.size(), hvd.rank())
opened, load = [], torch.load


def recording_load(path, *args, **kwargs):
    opened.append(Path(path).name)
    return load(path, *args, **kwargs)


torch.load = recording_load
weight, _, _ = load_rows(checkpoint, start, stop, num_instances, state, hvd.rank())
(out / f"rank{hvd.rank()}.json").write_text(json.dumps({"opened": opened, "rows": [start, stop],
                                                         "weight_rows": len(weight)}))
