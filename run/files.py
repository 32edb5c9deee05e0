"""Where derived files live on disk, and how several processes write one without tearing.

Derived files (the built-in dataset, instance indexes made without an output folder, what run/horovodrun.py
remembers) go under `$XDG_CACHE_HOME/instance-classifier` (default `~/.cache/instance-classifier`), keyed so that
the same source always maps to the same place. Every write is a private temporary followed by
`os.replace`/`os.rename`, which POSIX makes atomic within one file system: a reader sees the old content or the new
one, never a half-written file, even when all ranks of a job write the same thing at once. Standard library only:
a launcher (run/horovodrun.py) uses it without importing torch.
"""
import hashlib
import os
import uuid
from pathlib import Path


def cache_root():
    """The project's cache folder (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "instance-classifier"


def folder_key(folder):
    """A file-name-safe key for a folder: its name plus a hash of its absolute path, e.g. `train-1f2e3d4c`."""
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    return f"{folder.name}-{digest}"


def private_temporary(path):
    """A sibling of `path` that no other process will pick, for writing before an atomic rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_text_atomically(path, text):
    """Write `text` to `path` so that concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = private_temporary(path)
    temporary.write_text(text)
    os.replace(temporary, path)
