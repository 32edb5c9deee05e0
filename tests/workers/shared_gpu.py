"""trainer.py (argv: the trainer's own) under torchrun, every rank shown one GPU, the same one: a one-GPU
workstation given `torchrun --nproc_per_node 2`. The CUDA queries are stubbed (no GPU here) and the group is
gloo, so what is checked is the trainer's own refusal, before any work."""
import sys
from types import SimpleNamespace

import torch

from run import torch_engine

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda device: None
torch.cuda.get_device_name = lambda device=None: "Test GPU"
torch.cuda.get_device_properties = lambda device: SimpleNamespace(uuid="GPU-0f0e-test", major=9, minor=0)
torch_engine.device_backend = lambda: "gloo"

sys.argv = ["trainer.py", *sys.argv[1:]]
import trainer  # noqa: E402

trainer.main()
trainer.exit_now(0)
