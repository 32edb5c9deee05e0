"""`StepCounter`: kernels.launches.LaunchCounter that also records every collective of the engine, for the tests
and benchmarks that hold a step to its launches and collectives. A module of its own because LaunchCounter
imports Triton, which nothing else of run/ needs.
"""
from kernels.launches import LaunchCounter
from run.process_group import collective_observers


class StepCounter(LaunchCounter):
    """LaunchCounter that also records every collective of the engine, as "op name", in order (the collective's
    own work is not counted as launches)."""

    def __enter__(self):
        collective_observers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        collective_observers.remove(self)
        return super().__exit__(*exc)
