"""trainer.py run from a working directory of this rank's own, FOLDER/rank-R (argv: FOLDER, then the trainer's
flags): ranks that see different files under the same relative paths, as hosts without a shared file system do."""
import os
import sys

os.chdir(os.path.join(sys.argv[1], f"rank-{os.environ['HOROVOD_RANK']}"))
sys.argv = ["trainer.py", *sys.argv[2:]]

import trainer  # noqa: E402 (after the chdir: the trainer resolves --out against this rank's folder)

trainer.main()
