"""What an operation allocates, for the tests that hold the largest state of a run (the classifier shard) to the
copies of it that a step, an epoch's end or a resume makes."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class NewStorages(TorchDispatchMode):
    """Inside `with NewStorages() as new:`, new.allocated lists (shape, bytes) of every op output that got a
    storage of its own: not a view of an input, nor an input written in place."""

    def __init__(self):
        super().__init__()
        self.allocated = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor)}
        self.allocated.extend((tuple(leaf.shape), leaf.untyped_storage().nbytes()) for leaf in tree_leaves(out)
                              if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs)
        return out
