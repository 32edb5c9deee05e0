"""trainer.py, recording what this rank writes under --out and where the engine says it runs (argv: RECORD
folder, then the trainer's flags): RECORD/rankR.json {rank, size, local_rank, local_size, written}, written
being the paths relative to --out that this rank opened for writing, created, renamed or saved with torch.save
(which writes from C++, past the audit hook)."""
import json
import os
import sys
from pathlib import Path

import torch

record, sys.argv = Path(sys.argv[1]), ["trainer.py", *sys.argv[2:]]
out = Path(sys.argv[sys.argv.index("--out") + 1]).resolve()
written = set()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def note(path):
    path = Path(os.fsdecode(path)).resolve()
    if path.is_relative_to(out):
        written.add(str(path.relative_to(out)))


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (mode is not None and any(letter in mode for letter in "wax+")) or (mode is None and flags & WRITE_FLAGS):
            note(args[0])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        note(args[0])
    elif event == "os.rename":
        note(args[0])
        note(args[1])


def recording_save(obj, path, *args, **kwargs):
    note(path)
    return save(obj, path, *args, **kwargs)


save, torch.save = torch.save, recording_save
sys.addaudithook(audit)

import trainer  # noqa: E402 (after torch.save is wrapped: run.checkpoint calls it through the module)
from run.distributed import engine, exit_now  # noqa: E402

trainer.main()
world = engine()
(record / f"rank{world.rank}.json").write_text(json.dumps({
    "rank": world.rank, "size": world.size, "local_rank": world.local_rank, "local_size": world.local_size,
    "written": sorted(written)}))
exit_now(0)
