"""The run machinery, below the network (model/) and the data (data/), above kernels/, and importing neither
model/ nor data/ (tests/test_engines.py holds it to that): the process group and its collectives (distributed,
with horovod_engine the only module that imports horovod), how a run ends early (faults), one-line user errors
(errors), CPU threads (threads), the learning-rate schedule, what a run prints and records (run_log), the
classifier's epoch diagnostics, the layout of a run directory (layout) and its checkpoints (checkpoint), and where
derived files live and how every process writes one without tearing (files)."""
