"""The process group of a run, whatever starts it: the one module that knows the engine.

Every entry point (pretraining, `linear`, `knn`, every bench script) calls `start()` once, first; everything
else asks `engine()` for the rank, the size, the device and the collectives. The classifier, the checkpoints
and the evaluation are handed the engine or ask this module for it; none of them starts anything.

Engines (`--engine`):
  horovod  Horovod under horovodrun or mpirun: the design's launcher, named collectives (Horovod's response
           cache recognises a collective by its name). run/horovod_engine.py is the only module of the
           trainer that imports horovod;
  torch    torch.distributed under torchrun: NCCL on CUDA, gloo on CPU, no build (run/torch_engine.py);
  single   one process, no launcher, no process group and no Horovod: `python trainer.py`. Every collective
           over one rank is the identity; it returns a copy, as Horovod does, so callers may write into it.
  auto     torch under torchrun's environment (TORCHELASTIC_RUN_ID, or RANK, WORLD_SIZE and LOCAL_RANK),
           horovod under Horovod's (horovodrun's HOROVOD_RANK, mpirun's OMPI_COMM_WORLD_RANK, PMI_RANK or
           PMIX_RANK), single otherwise.
An engine implements the methods of `Engine` (run/process_group.py) that start with an underscore.

The collectives (op is one of "sum", "average", "min", "max"; `name` is the stable name where the engine takes
names, the same on every rank):
  allreduce(tensor, op, name)                  a new tensor
  grouped_allreduce(tensors, op, name)         one collective for a list of tensors
  allgather(tensor, name, same_shape)          the ranks' tensors concatenated on dim 0, first dims may differ
                                               (same_shape=True: the caller knows they do not)
  alltoall(tensor, splits, name, received)     (received, received_splits: the [P] int tensor of the rows
                                               that came from each rank; received=: the caller knows them)
  broadcast_parameters(named_tensors, root)    in place, from rank root
  broadcast_object(obj, root, name), allgather_object(obj, name)
  barrier(name)
  data_parallel_optimizer(optimizer, named_parameters, op)   gradients reduced over the ranks before each step
run/step_counter.py's `StepCounter` records them, by "op name", for tests and benchmarks that hold a step to its
collectives.

Gradient convention of the classifier (model/classifier.py): each rank's backbone gradient is its share of
d(global mean loss)/d(theta), so the backbone's data-parallel reduction is a SUM.
"""
import os
import socket
import sys

import torch

from run.errors import UsageError
from run.process_group import Engine, SingleProcess, gpu_ordinal  # noqa: F401  (the engines' interface, re-exported)
from run.threads import share_cpu_threads

ENGINES = ("auto", "horovod", "torch", "single")
# The variables Horovod's launchers set in every rank's environment: (rank variable, size variable).
HOROVOD_LAUNCH_VARIABLES = (("HOROVOD_RANK", "HOROVOD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                            ("PMI_RANK", "PMI_SIZE"), ("PMIX_RANK", None))
TORCH_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun (and torch's other launchers) set

_started = None  # the Engine of this process, once start() has run


# -------------------------------------------------------------------------------- choosing and starting
def launch_environment():
    """(launcher, world size or None) of the environment this process was started in: ("torch", n) under
    torchrun, ("horovod", n) under horovodrun or mpirun, (None, None) without a launcher."""
    if "TORCHELASTIC_RUN_ID" in os.environ or all(name in os.environ for name in TORCH_LAUNCH_VARIABLES):
        size = os.environ.get("WORLD_SIZE", "")
        return "torch", int(size) if size.isdigit() else None
    for rank_variable, size_variable in HOROVOD_LAUNCH_VARIABLES:
        if rank_variable in os.environ:
            size = os.environ.get(size_variable) if size_variable else None
            return "horovod", int(size) if size and size.isdigit() else None
    return None, None


def resolve_engine(requested):
    """The engine `requested` ("auto", "horovod", "single") comes to in this environment; a UsageError for a
    combination that cannot run, before any work."""
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested}: choose one of {', '.join(ENGINES)}")
    launcher, world_size = launch_environment()
    engine = requested if requested != "auto" else (launcher or "single")
    if engine == "single" and world_size is not None and world_size > 1:
        raise UsageError(f"--engine single: this process was launched as one of {world_size} ranks; drop "
                         f"--engine single under a launcher, or run one process: python trainer.py ...")
    if engine == "torch" and launcher != "torch":
        raise UsageError("--engine torch: this process was not started by torchrun (no TORCHELASTIC_RUN_ID, or "
                         "RANK, WORLD_SIZE and LOCAL_RANK); launch it as torchrun --nproc_per_node N trainer.py ...")
    if engine == "torch" and restarts_reuse_the_store():
        raise UsageError("torchrun --max-restarts: the restarted workers would meet in the store of the attempt before "
                         "(torchrun shares one between attempts) and can wait there for dead peers until the timeout; "
                         "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (a fresh store "
                         "per attempt)")
    if engine == "horovod" and launcher == "torch":
        raise UsageError("--engine horovod: this process was started by torchrun, whose ranks Horovod cannot "
                         "join; use --engine torch (or auto) under torchrun, or launch with horovodrun")
    if engine == "horovod":
        try:
            import run.horovod_engine  # noqa: F401  (imports horovod: is it there?)
        except ImportError as error:
            raise UsageError(f"--engine horovod: Horovod cannot be imported ({error}); `make setup` builds it, "
                             f"or run without a launcher: python trainer.py --engine single ...") from None
    return engine


def restarts_reuse_the_store():
    """True for a torchrun worker that torchrun may restart (--max-restarts > 0) while sharing its agent's store
    between attempts (TORCHELASTIC_USE_AGENT_STORE). The process group leaves its keys in that store under the
    same names in every attempt (each rank's address), so a restarted rank can read the address of a dead one
    before its own successor overwrites it, and wait for it. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes torchrun
    start a fresh store for every attempt."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0)


def start(requested="auto", announce=True, compute=None):
    """Start the process group of this process and return its Engine: the engine's defaults (set before it
    starts, which reads them), the process group, the fail-fast hook, this rank's CPU threads and device, and
    on rank 0 one line naming the engine, the ranks and their devices (and `compute`, e.g. "precision bf16",
    where the caller chose how they compute). Once per process; a second call returns the same engine."""
    global _started
    if _started is not None:
        return _started
    name = resolve_engine(requested)
    if name == "horovod":
        from run.horovod_engine import HorovodEngine  # imports horovod: only when it runs
        started = HorovodEngine()
    elif name == "torch":
        from run.torch_engine import TorchEngine
        started = TorchEngine()
    else:
        started = SingleProcess()
    _started = started
    end_job_on_failure(started)
    started.threads = share_cpu_threads(started.local_size)
    started.device = setup_device(started.local_rank)
    devices = started.allgather_object((describe_device(started.device), gpu_identity(started.device)),
                                       name="start.devices")
    refuse_shared_gpus([identity for _, identity in devices])  # every rank has the list: every rank refuses
    devices = [description for description, _ in devices]
    started.description = (
        f"engine {started.name}: {started.size} rank{'s' if started.size > 1 else ''}; "
        + "; ".join(f"rank {rank} {device}" for rank, device in enumerate(devices))
        + f"; torch threads {started.threads}" + (f"; {compute}" if compute else "")
        + "".join(f"; {variable}={value} (this trainer's default)" for variable, value in started.settings.items()))
    if announce and started.rank == 0:
        print(started.description, flush=True)
    return started


def engine():
    """The Engine start() returned; a RuntimeError before start()."""
    if _started is None:
        raise RuntimeError("no process group: call run.distributed.start() first (every entry point does)")
    return _started


def shutdown():
    """The started engine's shutdown (a rank that stops leaves the group first); a no-op before start(), when
    there is no group to leave."""
    if _started is not None:
        _started.shutdown()


def exit_now(status):
    """End this rank after a stop or an error: the engine's shutdown, so that the collectives of ranks still
    running fail now, then exit without the interpreter's teardown. That teardown can take seconds, long enough for
    horovodrun to SIGTERM the ranks still in it once the first one has exited, adding a "Terminated" line to
    their output."""
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def end_job_on_failure(started):
    """An exception no one catches ends this rank at once (exit_now): its traceback, or one line for a rank
    stopped by another rank's failure. started: the Engine (start() calls this)."""
    rank = started.rank

    def excepthook(kind, error, traceback):
        if started.is_peer_failure(error):
            print(f"error: rank {rank} stopped: another rank failed (its error is above)", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)
        exit_now(1)
    sys.excepthook = excepthook


# -------------------------------------------------------------------------------- devices and rows
def setup_device(local_rank):
    """This rank's device, made current (DALI's GPU pipelines decode on the current device): the GPU
    `gpu_ordinal(local rank, visible devices)` when CUDA is visible, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", gpu_ordinal(local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def describe_device(device):
    """One line naming the device a rank uses, for the start-up line: 'cpu', or
    'cuda:0 NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=3)': with a per-rank CUDA_VISIBLE_DEVICES the ordinal
    is 0 on every rank and only the variable tells the physical GPUs apart."""
    if device.type != "cuda":
        return str(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return f"{device} {torch.cuda.get_device_name(device)} (CUDA_VISIBLE_DEVICES={visible})"


def gpu_identity(device):
    """(host, GPU UUID) of a rank's CUDA device, None for the CPU: ranks with one identity share a GPU, whatever
    ordinals and CUDA_VISIBLE_DEVICES they see it through."""
    if device.type != "cuda":
        return None
    return socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid)


def refuse_shared_gpus(identities):
    """A UsageError naming the fix when two ranks would run on one GPU (NCCL refuses that at its first
    collective, "Duplicate GPU detected"); identities: every rank's gpu_identity, in rank order."""
    first_rank = {}
    for rank, identity in enumerate(identities):
        if identity is None:
            continue
        if identity in first_rank:
            host = identity[0]
            gpus = len({other for other in identities if other is not None and other[0] == host})
            raise UsageError(
                f"ranks {first_rank[identity]} and {rank} would share one GPU of {host} ({identity[1]}): NCCL runs "
                f"one rank per GPU; launch at most {gpus} rank{'s' if gpus > 1 else ''} on {host} (torchrun "
                f"--nproc_per_node {gpus}, horovodrun -np {gpus} -H {host}:{gpus}), or give each rank a GPU of "
                f"its own (CUDA_VISIBLE_DEVICES)")
        first_rank[identity] = rank


def shard_rows(num_instances, num_shards, rank):
    """The rows of W, i.e. the classes [start, stop), of rank `rank` in a balanced split of num_instances
    (sizes differ by <= 1)."""
    base, extra = divmod(num_instances, num_shards)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def barrier(name):
    engine().barrier(name)


@torch.no_grad()
def average_batchnorm_statistics(*modules):
    """BatchNorm running statistics move per rank; averaging them keeps one encoder on every rank
    (what the kNN monitor evaluates and rank 0 saves), as after a resume."""
    buffers = [buffer for module in modules for buffer in module.buffers() if buffer.is_floating_point()]
    if not buffers:
        return
    # One grouped collective, not one per buffer: each would wait for a Horovod cycle of its own.
    averages = engine().grouped_allreduce(buffers, op="average", name=f"bn.{len(buffers)}")
    for buffer, average in zip(buffers, averages):
        buffer.copy_(average)
