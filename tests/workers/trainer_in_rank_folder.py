"""trainer.py run from a working directory of this rank's own, FOLDER/rank-R (argv: FOLDER, then the trainer's
flags): ranks that see different files under the same relative paths, as hosts without a shared file system do."""
import os
import sys

rank = os.environ.get("HOROVOD_RANK", os.environ.get("RANK"))  # horovodrun's or torchrun's
os.chdir(os.path.join(sys.argv[1], f"rank-{rank}"))
sys.argv = ["trainer.py", *sys.argv[2:]]

import trainer  # noqa: E402 (after the chdir: the trainer resolves --out against this rank's folder)

trainer.main()
