"""How a multi-rank run ends early: every rank together, with one line that says why.

Preemption. SIGTERM (schedulers, `kill`, horovodrun) or SIGINT (Ctrl-C) during training finishes the current
step, writes a checkpoint and exits with 128 + the signal number; a second signal exits at once, without a
checkpoint. The ranks must stop after the SAME step, or their collectives part ways: a signal may reach one
rank only, or the ranks at different steps. So each step ends with one collective, an allreduce (max) of
the signal this rank has received (0 = none): every rank gets the same answer after the same step. Its cost
is the latency of one more small collective per step (Horovod's negotiation cycle plus a round trip), paid
after the optimizer step, with nothing to overlap it.
horovodrun itself turns a SIGTERM or SIGINT it receives into SIGTERM to every rank and SIGKILL 5 s later
(horovod.runner.common.util.safe_shell_exec.GRACEFUL_TERMINATION_TIME_S): the step and the checkpoint have
those 5 s; a checkpoint cut short stays hidden (run/checkpoint.py) and the previous one is kept.
Python runs signal handlers in the main thread between bytecodes, so a rank blocked in a collective whose
peer is gone would never see a second signal. A watcher thread reads the signals from Python's wakeup file
descriptor (written by the C-level handler at once; Horovod releases the GIL while it waits) and ends the
process on the second one.

A failing rank. An exception on one rank shuts the engine down on it, which fails the collectives the other
ranks are in or enter (Horovod: HorovodInternalError); horovodrun also sends SIGTERM to the ranks left once one
exits non-zero, and SIGKILL 5 s later. run.distributed's `end_job_on_failure` (installed by start()) makes every rank exit as soon as its exception is
reported, the others with one line instead of a traceback that buries the failing rank's error.

Errors that only some ranks see (a file one rank cannot read): `raise_on_every_rank` turns them into the
same UsageError on every rank, so no rank is left waiting in a collective.

Test-only fault hook: INSTANCE_CLASSIFIER_TEST_FAULT="RANK:EPOCH:STEP:WHAT" makes rank RANK, at the end of
step STEP of epoch EPOCH (both 1-based), raise a RuntimeError (WHAT=raise), send itself a signal
(WHAT=SIGTERM or SIGINT), wait up to a minute for a signal (WHAT=pause, so that a test can deliver one at a
known step), or wait a minute whatever comes (WHAT=hold, so that a test can deliver two one by one: Linux
merges a signal sent while the same one is still pending), or SIGKILL itself (WHAT=kill: a rank lost without a
trace, as on a dead node) in the first attempt of the job only: not in the workers torchrun restarts
(TORCHELASTIC_RESTART_COUNT > 0), so that the restart can finish. Read only in `end_of_step`;
tests/test_reliability.py, tests/test_clusters.py and bench/experiments/restarts.py use it. Never set it in a real run.
"""
import contextlib
import os
import signal
import sys
import threading
import time

import torch

from run.distributed import engine, exit_now
from run.errors import UsageError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TEST_FAULT_VARIABLE = "INSTANCE_CLASSIFIER_TEST_FAULT"
TEST_PAUSE_SECONDS = 60  # how long WHAT=pause and WHAT=hold wait before they let the step end anyway


class Preempted(Exception):
    """Raised on every rank after the same step; carries what the checkpoint of the interrupted epoch needs."""

    def __init__(self, signal_number, epoch, step_losses):
        self.signal_name = signal.Signals(signal_number).name
        self.exit_code = 128 + signal_number
        self.epoch, self.step_losses = epoch, list(step_losses)  # epoch 0-based; the losses of its steps so far
        super().__init__(f"stopped by {self.signal_name} after epoch {epoch + 1} step {len(step_losses)}")


class _StopRequest:
    """The first stop signal this rank received (0 = none)."""
    signal_number = 0


def _note_signal(signal_number, frame=None):
    if not _StopRequest.signal_number:
        _StopRequest.signal_number = signal_number


def _watch_signals(read_fd):
    """Count stop signals as the C-level handler reports them; the second one ends the process now."""
    count = 0
    while data := os.read(read_fd, 64):  # empty: stop_on_signals() closed the write end
        for signal_number in data:
            if signal_number in STOP_SIGNALS:
                count += 1
                _note_signal(signal_number)
                if count >= 2:
                    os.write(2, f"error: second {signal.Signals(signal_number).name}: exiting now, without a "
                                f"checkpoint\n".encode())
                    os._exit(128 + signal_number)
    os.close(read_fd)


@contextlib.contextmanager
def stop_on_signals():
    """Inside, SIGTERM and SIGINT request a stop at the end of the current step (see end_of_step); on leaving,
    however it is left, the handlers before are back: after training there is no step to finish, and the process
    may go on (main() run by a test)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block
    previous_handlers = {number: signal.signal(number, _note_signal) for number in STOP_SIGNALS}
    previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_fd,), name="stop-signals", daemon=True).start()
    try:
        yield
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(previous_wakeup_fd)
        os.close(write_fd)  # the watcher reads EOF and ends


def end_of_step(epoch, step_losses):
    """Collective, on every rank after every training step (epoch 0-based, step_losses: this epoch's losses so far):
    raises Preempted on every rank when any rank has received a stop signal."""
    _test_fault(epoch + 1, len(step_losses))
    seen = torch.tensor([_StopRequest.signal_number], dtype=torch.int32)
    agreed = int(engine().allreduce(seen, op="max", name="faults.stop_signal").item())
    if agreed:
        raise Preempted(agreed, epoch, step_losses)


def exit_preempted(stop, checkpoint, master):
    """After the checkpoint of a stop: one line (rank 0), and the exit status of the signal on every rank."""
    if master:
        print(f"error: {stop}: wrote {checkpoint}; the same command resumes from it", file=sys.stderr)
    exit_now(stop.exit_code)


def raise_on_every_rank(error):
    """Collective: every rank passes None or the one-line error it met; if any rank met one, every rank raises
    the same UsageError, naming the first such rank unless all of them met the same."""
    errors = engine().allgather_object(error, name="faults.errors")
    for rank, message in enumerate(errors):
        if message is not None:
            raise UsageError(message if errors.count(message) == len(errors) else f"rank {rank}: {message}")


def _test_fault(epoch, step):
    """The test-only fault hook (module docstring); a no-op unless INSTANCE_CLASSIFIER_TEST_FAULT is set."""
    fault = os.environ.get(TEST_FAULT_VARIABLE)
    if not fault:
        return
    rank, at_epoch, at_step, what = fault.split(":")
    if (int(rank), int(at_epoch), int(at_step)) != (engine().rank, epoch, step):
        return
    if what == "raise":
        raise RuntimeError(f"test fault on rank {rank} at epoch {epoch} step {step}")
    if what == "kill":
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    if what in ("pause", "hold"):
        deadline = time.monotonic() + TEST_PAUSE_SECONDS
        while not (what == "pause" and _StopRequest.signal_number) and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        os.kill(os.getpid(), signal.Signals[what])
