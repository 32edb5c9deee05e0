"""torch threads of this rank after the trainer's share_cpu_threads (argv: output folder): rankR.json."""
import json
import os
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from run.threads import share_cpu_threads

hvd.init()
description = share_cpu_threads(hvd.local_size())
(Path(sys.argv[1]) / f"rank{hvd.rank()}.json").write_text(json.dumps(
    {"threads": torch.get_num_threads(), "description": description, "cores": len(os.sched_getaffinity(0)),
     "local_ranks": hvd.local_size()}))
