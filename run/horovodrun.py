"""horovodrun as run/launch.py starts it: Horovod's own launcher (horovod.runner.launch), with one question answered
from memory. Before every Gloo job horovodrun asks whether Horovod was built with Gloo by importing its torch
extension, and so torch, in a forked process: about 1.5 CPU-seconds, most of what starting a job costs it. The
answer changes only when Horovod is reinstalled, so a yes is remembered per build of the extension (its path, size
and modification time) in the project's cache folder; anything else is asked again. Everything else is horovodrun's.

    python -m run.horovodrun --gloo -np 2 -H localhost:2 python trainer.py ...   (horovodrun's arguments)
"""
import hashlib
import importlib.util
import sys
from pathlib import Path

if __name__ == "__main__":  # run by path (run/launch.py): the project's root on the path, not run/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import horovod.runner.launch as horovodrun  # Horovod's launcher alone: it imports no framework
from horovod.common.util import gloo_built

from run.files import cache_root, write_text_atomically


def remembered_gloo_built(verbose=False):
    """horovod.common.util.gloo_built, a yes remembered per build of Horovod's torch extension."""
    extensions = sorted(Path(importlib.util.find_spec("horovod.torch").origin).parent.glob("mpi_lib_v2*.so"))
    if not extensions:
        return gloo_built(verbose=verbose)  # not built for torch: horovodrun's own check says what it finds
    stat = extensions[0].stat()
    build = hashlib.sha256(f"{extensions[0]} {stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()[:16]
    remembered = cache_root() / f"horovod-gloo-built-{build}"
    if remembered.is_file():
        return True
    built = gloo_built(verbose=verbose)
    if built:
        try:
            write_text_atomically(remembered, "yes\n")  # launches at the same time read it whole or not at all
        except OSError:
            pass  # a cache that cannot be written only costs the next launch the question again
    return built


if __name__ == "__main__":
    horovodrun.gloo_built = remembered_gloo_built  # the name run_controller calls
    sys.argv[0] = "horovodrun"
    sys.exit(horovodrun.run_commandline())
