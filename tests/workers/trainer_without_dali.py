"""Run trainer.py with the given arguments in a process where importing DALI fails (argv: trainer flags)."""
import runpy
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path


class NoDali(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError(f"{name} imported by a run that must not need DALI")
        return None


sys.meta_path.insert(0, NoDali())
sys.argv = ["trainer.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).resolve().parents[2] / "trainer.py"), run_name="__main__")
assert not any(name.startswith("nvidia.dali") for name in sys.modules)
