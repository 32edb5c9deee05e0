"""run/launch.py's command-line form, what the Makefile and bench/engines.sh start their jobs with: the command it
builds for each engine (in this process), its one-line errors, and one real 2-rank job under each launcher."""
import os
import re
import subprocess
import sys

import pytest

from run import launch as launcher
from tests.conftest import ROOT

SCRIPT = "trainer.py"  # any file that exists, relative to the root the tests run the command line from


@pytest.fixture(autouse=True)
def at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("options, engine, ranks, argv, keywords", [
    ([], "horovod", 2, ["--out", "runs/demo"], {}),
    (["--hosts", "localhost:1,127.0.0.1:1"], "horovod", 2, [], {"hosts": "localhost:1,127.0.0.1:1"}),
    ([], "torch", 3, ["--engine", "torch"], {}),
    (["--max-restarts", "2", "--tee"], "torch", 1, [], {"max_restarts": 2, "tee": True}),
    (["--nodes", "1:2", "--rendezvous", "127.0.0.1:29400"], "torch", 1, [],
     {"nodes": "1:2", "rendezvous": "127.0.0.1:29400"}),
    ([], "single", 1, ["plan", "--gpus", "2"], {}),
])
def test_the_command_line_builds_what_launch_builds(options, engine, ranks, argv, keywords):
    assert (launcher.command_line([*options, engine, str(ranks), SCRIPT, *argv])
            == launcher.launch(engine, ranks, SCRIPT, *argv, **keywords))


def test_the_scripts_own_options_pass_through_untouched():
    """Everything after SCRIPT is the script's, the launcher's own option names and -h included."""
    command, _ = launcher.command_line(["horovod", "2", SCRIPT, "-h", "--hosts", "x", "--", "--tee"])
    assert command[-5:] == ["-h", "--hosts", "x", "--", "--tee"] and command[command.index("-H") + 1] == "localhost:2"


@pytest.mark.parametrize("arguments, message", [
    (["mpi", "2", SCRIPT], "argument ENGINE: invalid choice: 'mpi'"),
    (["horovod", "two", SCRIPT], "argument RANKS: invalid int value: 'two'"),
    (["horovod", "0", SCRIPT], "0 ranks under engine horovod"),
    (["single", "2", SCRIPT], "2 ranks under engine single"),
    (["horovod", "2"], "the following arguments are required: SCRIPT"),
    (["horovod", "2", "no_such_script.py"], "no script no_such_script.py"),
    (["--tee", "horovod", "2", SCRIPT], "--tee: torchrun's, not engine horovod's"),
    (["--max-restarts", "1", "single", "1", SCRIPT], "--max-restarts: torchrun's, not engine single's"),
    (["--hosts", "localhost:2", "torch", "2", SCRIPT], "--hosts: horovodrun's, not engine torch's"),
    (["--nodes", "2", "torch", "1", SCRIPT], "--nodes and --rendezvous go together"),
    (["--max-restarts", "-1", "torch", "1", SCRIPT], "--max-restarts -1: must be 0 or more"),
])
def test_bad_input_is_one_line_naming_it(arguments, message, capsys):
    with pytest.raises(SystemExit) as stop:
        launcher.command_line(arguments)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and error.startswith("python -m run.launch: "), error
    assert message in error, error


def test_help_says_the_engines_and_how_to_call_it(capsys):
    with pytest.raises(SystemExit) as stop:
        launcher.command_line(["--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0 and "ENGINE RANKS SCRIPT" in help_text
    assert all(f"\n  {engine}  " in help_text for engine in launcher.ENGINES)
    assert "python -m run.launch horovod 2 trainer.py --out runs/demo" in help_text


# Prints what its launcher told it: rank and world size (horovodrun's and torchrun's variables), and its arguments.
REPORT = """import os, sys
rank = os.environ.get("HOROVOD_RANK", os.environ.get("RANK", "0"))
size = os.environ.get("HOROVOD_SIZE", os.environ.get("WORLD_SIZE", "1"))
print(f"rank {rank} of {size}: {sys.argv[1:]}", flush=True)
sys.exit(int(os.environ.get("EXIT_STATUS", "0")))
"""


def run_command_line(tmp_path, *arguments, env=None):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    return subprocess.run([sys.executable, "-m", "run.launch", *arguments[:2], str(script), *arguments[2:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("engine", [pytest.param("horovod", marks=pytest.mark.horovod),
                                    pytest.param("torch", marks=pytest.mark.torchrun)])
def test_a_two_rank_job_from_the_command_line(engine, tmp_path):
    result = run_command_line(tmp_path, engine, "2", "--out", "runs/x")
    assert result.returncode == 0, result.stdout + result.stderr
    reports = sorted(re.findall(r"rank \d+ of \d+: \[.*?\]", result.stdout))  # the workers' lines may interleave
    assert reports == ["rank 0 of 2: ['--out', 'runs/x']", "rank 1 of 2: ['--out', 'runs/x']"], result.stdout


def test_the_job_replaces_the_launcher_and_its_exit_status_is_the_commands(tmp_path):
    result = run_command_line(tmp_path, "single", "1", env={**os.environ, "EXIT_STATUS": "3"})
    assert result.returncode == 3 and result.stdout == "rank 0 of 1: []\n", result


def test_horovodrun_remembers_that_horovod_has_gloo_per_build_and_asks_again_otherwise(tmp_path, monkeypatch):
    """run/horovodrun.py answers horovodrun's build check from the cache after one yes; a no is not remembered,
    and another build of the extension (its modification time changed) is asked again."""
    horovodrun = pytest.importorskip("run.horovodrun", reason="Horovod is not installed here")
    extension = tmp_path / "horovod" / "torch" / "mpi_lib_v2.cpython-311-x86_64-linux-gnu.so"
    extension.parent.mkdir(parents=True)
    extension.write_bytes(b"a build")
    spec = type("Spec", (), {"origin": str(extension.parent / "__init__.py")})
    monkeypatch.setattr(horovodrun.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    answers, asked = [False, True, True], []

    def gloo_built(verbose=False):
        asked.append(verbose)
        return answers[len(asked) - 1]
    monkeypatch.setattr(horovodrun, "gloo_built", gloo_built)
    assert [horovodrun.remembered_gloo_built() for _ in range(3)] == [False, True, True]
    assert len(asked) == 2  # the no asked again, the yes remembered
    os.utime(extension, ns=(0, 0))  # another build of the extension
    assert horovodrun.remembered_gloo_built() is True and len(asked) == 3
    assert len(list((tmp_path / "cache" / "instance-classifier").iterdir())) == 2  # one answer per build
