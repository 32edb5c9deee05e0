"""The Horovod engine of run/distributed.py: the only module of the trainer that imports horovod.

Every collective keeps the name it is given, so Horovod's response cache recognises it on the next step instead
of negotiating it again (tests/test_kernels_classifier.py runs with the cache cut to four entries).
"""
import os
import time

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError

from run.process_group import Engine

# Horovod's background thread negotiates and runs the queued collectives once per cycle, 1 ms by default, so
# a collective that the host waits for costs up to a cycle of latency on top of its transfer. The classifier
# waits for three per step, one after the other (features with ids, statistics, dE): on a GPU the cycle is
# most of their cost, and at 0.1 ms the wait is a fraction of a small collective's transfer, while a shorter
# cycle would only wake the thread more often. A longer one fuses more of the backbone's gradient all-reduces
# per cycle, which this step does not need (they are large enough to run at full bandwidth on their own).
# CPU ranks (gloo) are the other way round: a step takes a second or so, and every cycle is a round trip
# between the ranks' background threads that takes CPU time from the compute threads, which fill every core
# (run/threads.py). A cycle adds at most 5 ms to each collective the host waits for. bench/RESULTS.md ("CPU
# speed of the demo") has the measurement behind the CPU value.
GPU_CYCLE_TIME_MS = "0.1"
CPU_CYCLE_TIME_MS = "5"
OPS = {"sum": hvd.Sum, "average": hvd.Average, "min": hvd.Min, "max": hvd.Max}
# hvd.synchronize waits for a collective by spinning (poll, yield, poll): a CPU rank waiting for a slower one
# burns a core on system calls for the whole wait, which the yields hand back to the slower rank but which other
# work sharing the cores (another job, a second launch on the machine) competes with. CPU ranks therefore sleep
# between polls, from FIRST_PAUSE_S doubling to LONGEST_PAUSE_S, well under the CPU cycle, so a wait ends at most
# that much after its collective. GPU ranks keep Horovod's spin: there the host has no compute threads to
# disturb, and a sleep would add its wake-up to each of the step's waits.
FIRST_PAUSE_S, LONGEST_PAUSE_S = 50e-6, 1e-3


def default_horovod_environment():
    """Set Horovod's settings this workload needs where the user has not set them; before hvd.init(), which
    reads them. HOROVOD_CYCLE_TIME (ms): GPU_CYCLE_TIME_MS when the ranks train on GPUs, CPU_CYCLE_TIME_MS on
    CPU ranks (see there). Returns {variable: value} of what it set."""
    chosen = {}
    if "HOROVOD_CYCLE_TIME" not in os.environ:
        cycle = GPU_CYCLE_TIME_MS if torch.cuda.is_available() else CPU_CYCLE_TIME_MS
        chosen["HOROVOD_CYCLE_TIME"] = os.environ["HOROVOD_CYCLE_TIME"] = cycle
    return chosen


class HorovodEngine(Engine):
    name = "horovod"

    def __init__(self):
        self.settings = default_horovod_environment()
        self.sleeps_while_waiting = not torch.cuda.is_available()
        hvd.init()
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def sleep_until_done(self, handle):
        """Return once the collective of `handle` has finished (hvd.synchronize then collects it at once);
        on a CPU rank asleep between polls (see LONGEST_PAUSE_S), on a GPU rank at once, leaving the wait to
        Horovod's spin."""
        pause = FIRST_PAUSE_S
        while self.sleeps_while_waiting and not hvd.poll(handle):
            time.sleep(pause)
            pause = min(2 * pause, LONGEST_PAUSE_S)

    def _result(self, handle):
        self.sleep_until_done(handle)
        return hvd.synchronize(handle)

    # The asynchronous forms, which skip Horovod's autograd functions: no caller differentiates through a
    # collective (the classifier's backward sends dE back by an alltoall of its own).
    def _allreduce(self, tensor, op, name):
        return self._result(hvd.allreduce_async(tensor, op=OPS[op], name=name))

    def _grouped_allreduce(self, tensors, op, name):
        return self._result(hvd.grouped_allreduce_async(tensors, op=OPS[op], name=name))

    def _allgather(self, tensor, name, same_shape):
        return self._result(hvd.allgather_async(tensor, name=name))

    def _alltoall(self, tensor, splits, name, received):
        return self._result(hvd.alltoall_async(tensor, splits=splits, name=name))

    def _broadcast_parameters(self, named_tensors, root):
        hvd.broadcast_parameters(named_tensors, root_rank=root)

    def _broadcast_object(self, obj, root, name):
        return hvd.broadcast_object(obj, root_rank=root, name=name)

    def _allgather_object(self, obj, name):
        return hvd.allgather_object(obj, name=name)

    def _data_parallel_optimizer(self, optimizer, named_parameters, op):
        distributed = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, op=OPS[op])
        collect_gradients = distributed.synchronize  # what step() calls first; it would spin on each all-reduce

        def synchronize():
            # The gradients' all-reduces, started by backward's hooks, are in Horovod's private _handles
            # {parameter or group: (handle, context)}; the handle is None (or a function) for one not started.
            for handle, _ in list(distributed._handles.values()):
                if isinstance(handle, int):
                    self.sleep_until_done(handle)
            collect_gradients()

        distributed.synchronize = synchronize
        return distributed

    def is_peer_failure(self, error):
        return isinstance(error, HorovodInternalError)

    def shutdown(self):
        hvd.shutdown()
