"""Count what a piece of code launches, without a GPU: a proxy for its launch overhead on CUDA.

On a GPU a step of the classifier at small batches can cost more in launches, collectives and host
synchronisations than in arithmetic. This counts them on any machine, so tests can hold them to a budget:

  launches     every aten op that runs a kernel (views, allocations and metadata are free) and every
               Triton kernel launch (the torch calls of Triton's CPU interpreter are not counted);
  collectives  what the code that runs them reports through `collective(name)`, in order (the project's
               process group, run/distributed.py, reports each of its collectives as "op name" to a
               run.step_counter.StepCounter, this class plus that hook; kernels/ itself knows no process group);
  syncs        every op whose result the host must read before it can go on: `.item()`, `int(t)`,
               `if t.any()`, `.tolist()`, `nonzero`, boolean-mask indexing. On CUDA each makes the CPU
               wait for the GPU.

    with LaunchCounter() as counted:
        classifier(features, ids).loss.backward()
    counted.launches, counted.collectives, counted.syncs   # lists of names, in order

An aten op is one CUDA kernel in most cases; a few launch several (sort, for instance), so on a GPU
the profiler's count (bench/classifier_step.py --cuda) is the exact figure.
"""
import contextlib

import torch
import triton.runtime.jit
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or describe memory without running a kernel; scalar_tensor wraps a Python number
# given to an op (a CPU scalar, also on CUDA); _unsafe_view is a view of a fresh temporary.
FREE_OPS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
            torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
            torch.ops.aten.lift_fresh.default, torch.ops.aten.resize_.default, torch.ops.aten.set_.source_Storage,
            torch.ops.aten.set_.source_Storage_storage_offset, torch.ops.aten.promote_types.default,
            torch.ops.aten.scalar_tensor.default, torch.ops.aten._unsafe_view.default}
# Ops whose output shape depends on the data: the host waits for it (with a boolean index for index ops).
_INHERITED = object()  # marks a patched attribute that the class only inherited
SHAPE_FROM_DATA_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


def _has_boolean_index(args):
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


class LaunchCounter(TorchDispatchMode):
    """Context manager: records launches, collectives and host syncs of the code it wraps (see module doc)."""

    def __init__(self):
        super().__init__()
        self.launches, self.collectives, self.syncs = [], [], []
        self._paused = 0
        self._restore = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            tags = set(func.tags)
            if torch.Tag.data_dependent_output in tags or (torch.Tag.dynamic_output_shape in tags and (
                    func not in SHAPE_FROM_DATA_OPS or _has_boolean_index(args))):
                self.syncs.append(str(func))
            if not func.is_view and func not in FREE_OPS and torch.Tag.data_dependent_output not in tags:
                self.launches.append(str(func))
        return func(*args, **(kwargs or {}))

    def _uncounted(self, record, name, call):
        """Wrap `call` so that it is recorded once, as `name` in `record`, and its insides are not (nor is it,
        inside another uncounted call: a collective's own bookkeeping is the collective's)."""
        def wrapped(*args, **kwargs):
            if self._paused:
                return call(*args, **kwargs)
            with self._recorded(record, name):
                return call(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def _recorded(self, record, name):
        record.append(name)
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def collective(self, name):
        """Context manager around one collective: recorded as `name`; the ops it runs inside are not launches."""
        return self._recorded(self.collectives, name)

    def _patch(self, owner, attribute, replacement):
        """setattr, undone on exit (an attribute that was inherited is deleted again)."""
        self._restore.append((owner, attribute, vars(owner).get(attribute, _INHERITED)))
        setattr(owner, attribute, replacement)

    def __enter__(self):
        # Triton: `kernel[grid](...)` goes through KernelInterface.__getitem__ (JIT and interpreter alike).
        getitem = triton.runtime.jit.KernelInterface.__getitem__
        self._patch(triton.runtime.jit.KernelInterface, "__getitem__", lambda kernel, grid: self._uncounted(
            self.launches, f"triton {kernel.__name__}", getitem(kernel, grid)))
        tolist = torch.Tensor.tolist
        self._patch(torch.Tensor, "tolist", self._uncounted(self.syncs, "tolist", tolist))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attribute, original in reversed(self._restore):
            if original is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        return super().__exit__(*exc)
