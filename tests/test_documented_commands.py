"""Every launch command that README.md and trainer.py's docstring print works as printed.

The list is read from the docs themselves, so a command added there is checked here without an edit: README.md's
```bash blocks and its inline `python trainer.py ...` / `trainer.py ...` / `make ...` spans, trainer.py's docstring's
indented lines and its backticked subcommands (`knn --ckpt RUN` is `python trainer.py knn --ckpt RUN`;
`SUBCOMMAND` stands for every subcommand the docs name). Each is checked by what it needs:

  make targets            `make -n TARGET` (what it would run, without running it);
  the user's data or      (`--data /imagenet`, hosts other than localhost, a `--ckpt` that no runnable documented
  hosts                   command writes, a placeholder such as RUN): the trainer's own argument parsing, and for
                          pretraining its settings check (trainer.resolve_config), in this process;
  everything else         run, at tiny sizes: the built-in data is a 12-images-per-digit copy put where the
                          trainer's cache looks (XDG_CACHE_HOME), the sizes of the network, the epochs, batches,
                          steps, instances and ranks (at most 2) are substituted, and the rest of the command is as
                          printed: its launcher (horovodrun, or torchrun when the trainer has a torch engine), its
                          flags, its output folder (in a scratch directory). A command that writes a run another
                          command reads (`--out runs/demo`, then `linear --ckpt runs/demo`) runs first; help
                          (`-h`) and `plan` without a launcher run as main() in this process.
A launcher this file does not know, or a command that is not a trainer launch nor a make target, fails with the
line that names it: there is no silent skip.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.trainer_runs import copy_tiny_dataset, main_in_process

LAUNCHERS = ("horovodrun", "torchrun")
INTERPRETERS = ("python", "python3")
DEFAULT_OUT = "runs/pretrain"  # trainer.py's --out default
MAX_RANKS = 2  # enough for every collective, and what 2 cores run
# Substituted sizes, by subcommand (None: pretraining). The built-in data warms up for 1 epoch (trainer.py's
# BUILTIN_DEFAULTS), so its runs take 2; the warm-up itself is left as printed.
TINY_NETWORK = {"--image-size": "32", "--arch": "resnet18", "--width": "8", "--small-stem": None,
                "--hidden-dim": "32", "--feat-dim": "16", "--batch-size": "8", "--threads": "1"}
TINY = {None: TINY_NETWORK, "linear": {"--epochs": "1", "--batch-size": "16"}}
TINY_BUILTIN = {"--epochs": "2"}
TINY_SYNTHETIC = {"--epochs": "1", "--instances": "64", "--steps-per-epoch": "2"}


@dataclass
class Command:
    text: str  # as printed
    source: str
    env: dict = field(default_factory=dict)
    make_target: str = None
    make_variables: list = field(default_factory=list)  # `make TARGET NAME=value`: the NAME=value words
    launcher: str = None  # horovodrun, torchrun, or None: a plain interpreter
    launcher_args: list = field(default_factory=list)
    args: list = field(default_factory=list)  # the trainer's arguments

    @property
    def subcommand(self):
        return self.args[0] if self.args and not self.args[0].startswith("-") else None

    def flag(self, name, default=None):
        return self.args[self.args.index(name) + 1] if name in self.args[:-1] else default

    def key(self):
        """What makes two printed commands the same launch (environment and interpreter paths aside)."""
        return ((self.make_target, *self.make_variables) if self.make_target else
                (self.launcher, tuple(self.launcher_args), tuple(self.args)))


def printed_commands():
    """(source, text) of every launch command README.md and trainer.py's docstring print, continuations joined."""
    readme = (ROOT / "README.md").read_text()
    found = [("README.md", line) for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
             for line in joined_lines(block)]
    found += [("README.md", span) for span in re.findall(r"`([^`\n]+)`", readme)
              if re.match(r"((\S*/)?python3? )?trainer\.py \S|make \w", span)]
    import trainer
    doc = trainer.__doc__
    found += [("trainer.py docstring", line) for line in joined_lines(doc) if line.startswith("    ")]
    for span in re.findall(r"`([^`]+)`", doc):
        span = " ".join(span.split())
        found.append(("trainer.py docstring", span if span.startswith(("python ", "trainer.py")) else
                      f"python trainer.py {span}"))
    found = [(source, re.sub(r"\s#\s.*$", "", text)) for source, text in found]  # the comments beside commands
    return [(source, " ".join(text.split())) for source, text in found if text.strip()]


def joined_lines(text):
    """The lines of text with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def parse(source, text):
    words = shlex.split(text, comments=True)
    command = Command(text=text, source=source)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        command.env[name] = value
    if words[:1] == ["make"] and len(words) >= 2 and all(re.match(r"^[A-Z_][A-Z0-9_]*=\S", word) for word in words[2:]):
        command.make_target, command.make_variables = words[1], words[2:]
        return command
    names = [Path(word).name for word in words]
    if "trainer.py" not in names:
        raise AssertionError(f"{source} prints `{text}`, which is neither a trainer launch nor a make target: "
                             f"say in tests/test_documented_commands.py how to check it")
    before, command.args = words[:names.index("trainer.py")], words[names.index("trainer.py") + 1:]
    if before and Path(before[-1]).name in INTERPRETERS:
        before = before[:-1]
    if before:
        command.launcher, command.launcher_args = Path(before[0]).name, before[1:]
        if command.launcher not in LAUNCHERS:
            raise AssertionError(f"{source} prints `{text}`: launcher {command.launcher} is not one this test knows "
                                 f"({', '.join(LAUNCHERS)}): add how to run it")
    return command


def documented_commands():
    """The distinct documented commands, `SUBCOMMAND` expanded to every subcommand the docs name."""
    commands = [parse(source, text) for source, text in printed_commands()]
    subcommands = sorted({command.subcommand for command in commands} - {None, "SUBCOMMAND"})
    expanded = []
    for command in commands:
        if command.subcommand == "SUBCOMMAND":
            expanded += [parse(command.source, command.text.replace("SUBCOMMAND", name)) for name in subcommands]
        else:
            expanded.append(command)
    distinct = {}
    for command in expanded:
        distinct.setdefault(command.key(), command)
    return list(distinct.values())


COMMANDS = documented_commands()


def hosts(command):
    value = next((b for a, b in zip(command.launcher_args, command.launcher_args[1:]) if a in ("-H", "--hosts")), "")
    return [host.split(":")[0] for host in value.split(",") if host]


def written_runs():
    """The --out of every documented pretraining run that needs nothing of the user's."""
    return {command.flag("--out", DEFAULT_OUT) for command in COMMANDS
            if command.make_target is None and command.subcommand is None and not needs_the_user(command, set())}


def needs_the_user(command, runs):
    """True when the command needs the user's data, hosts or runs (runs: the run folders the docs' own runnable
    commands write) or has a placeholder left."""
    data = command.flag("--data")
    return (any(host != "localhost" for host in hosts(command)) or (data is not None and data != "synthetic")
            or (command.flag("--ckpt") is not None and command.flag("--ckpt") not in runs)
            or any(re.fullmatch(r"[A-Z]{2,}", word) for word in command.args))


RUNS = written_runs()
PARSED = [command for command in COMMANDS if command.make_target is None and needs_the_user(command, RUNS)]
RUN = [command for command in COMMANDS if command.make_target is None and not needs_the_user(command, RUNS)]
MAKE = [command for command in COMMANDS if command.make_target is not None]


def test_the_docs_commands_are_found():
    """The parser reads what the docs print: the demo, the ImageNet recipe, the synthetic run and make demo are
    among the commands checked below (an edit of the docs' layout must not leave this file checking nothing)."""
    texts = {command.text for command in COMMANDS}
    assert any("--data /imagenet" in text for text in texts) and any("--data synthetic" in text for text in texts)
    assert {"demo", "test"} <= {command.make_target for command in MAKE}
    assert "runs/demo" in RUNS and any(command.subcommand == "linear" and command.flag("--ckpt") == "runs/demo"
                                       for command in RUN)
    assert {"knn", "export", "plan", "linear"} <= {command.subcommand for command in COMMANDS}


class Parsed(Exception):
    """Raised where a subcommand has parsed its arguments, before it does any work."""


@pytest.mark.parametrize("command", PARSED, ids=lambda command: command.text)
def test_commands_that_need_the_users_data_parse_and_pass_the_settings_check(command, monkeypatch):
    import trainer
    if command.subcommand is None:
        config = trainer.resolve_config(trainer.parser.parse_args(command.args))  # UsageError on a bad setting
        assert config.out == command.flag("--out", DEFAULT_OUT)
        return
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        raise Parsed(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", ["trainer.py", *command.args])
    with pytest.raises(Parsed):
        trainer.main()


@pytest.mark.parametrize("command", MAKE, ids=lambda command: command.text)
def test_make_targets_dry_run(command):
    """`make -n` of the target prints what it would run; a variable set on the command line is one the recipe
    reads (its value appears in what it would run)."""
    result = subprocess.run(["make", "-n", command.make_target, *command.make_variables], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    for variable in command.make_variables:
        assert f" {variable.split('=', 1)[1]} " in result.stdout, (variable, result.stdout)


def substituted(args, sizes):
    """args with each flag of `sizes` set to its value (added when absent; a value None is a switch)."""
    args = list(args)
    for name, value in sizes.items():
        if name in args:
            if value is not None:
                args[args.index(name) + 1] = value
        else:
            args += [name] if value is None else [name, value]
    return args


def tiny_command(command, workdir):
    """(argv, env) of the command at tiny sizes, run from workdir (its relative --out lands there)."""
    args = command.args
    if command.subcommand is None and "-h" not in args:
        args = substituted(args, {**TINY_NETWORK, **(TINY_SYNTHETIC if command.flag("--data") == "synthetic"
                                                     else TINY_BUILTIN)})
    elif command.subcommand in TINY and "-h" not in args:
        args = substituted(args, TINY[command.subcommand])
    argv = [sys.executable, str(ROOT / "trainer.py"), *args]
    launcher_args = list(command.launcher_args)
    for position, word in enumerate(launcher_args[:-1]):
        following = launcher_args[position + 1]
        if word in ("-np", "--nproc_per_node", "--nproc-per-node") and following.isdigit():
            launcher_args[position + 1] = str(min(int(following), MAX_RANKS))
        if word in ("-H", "--hosts"):
            launcher_args[position + 1] = ",".join(
                f"{host.split(':')[0]}:{min(int(host.split(':')[1]), MAX_RANKS)}" for host in following.split(","))
    if command.launcher == "horovodrun":
        argv = [str(Path(sys.executable).parent / "horovodrun"), *launcher_args, *argv]
    elif command.launcher == "torchrun":
        import trainer
        if "torch" not in trainer.ENGINES:
            pytest.fail(f"{command.source} prints `{command.text}`, a torchrun launch, but trainer.py has no torch "
                        f"engine (--engine {'|'.join(trainer.ENGINES)})")
        argv = [str(Path(sys.executable).parent / "torchrun"), *launcher_args, *argv[1:]]  # torchrun runs python
    env = {**os.environ, **command.env, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(workdir / "cache")}
    env.pop("TRITON_INTERPRET", None)  # as a user's shell: the CPU path is the chunked torch backend
    return argv, env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The scratch folder the commands run in, with the tiny built-in data where the trainer's cache looks."""
    from data.builtin import DATASET_NAME
    root = tmp_path_factory.mktemp("documented")
    copy_tiny_dataset(root / "cache" / "instance-classifier" / DATASET_NAME)
    return root


@pytest.fixture(scope="module")
def run_command(workdir):
    """Runs a documented command once (the runs it reads first), returning its CompletedProcess."""
    done = {}

    def run(command):
        if command.key() in done:
            return done[command.key()]
        needed = command.flag("--ckpt")
        if needed is not None:
            writer = next(other for other in RUN
                          if other.subcommand is None and other.flag("--out", DEFAULT_OUT) == needed)
            assert run(writer).returncode == 0, f"{writer.text} (which writes {needed}) failed"
        argv, env = tiny_command(command, workdir)
        done[command.key()] = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
        return done[command.key()]
    return run


def in_process(command):
    """Help and `plan` without a launcher run as trainer.py's main() in this process: parsing and arithmetic, to
    which a process start adds nothing (the plain `python trainer.py` runs among the commands check the script as a
    process)."""
    return command.launcher is None and not command.env and ("-h" in command.args or command.subcommand == "plan")


def run_marks(command):
    marks = [pytest.mark.slow]
    if command.launcher == "horovodrun" or any(other.launcher == "horovodrun" and other.flag("--out", DEFAULT_OUT)
                                               == command.flag("--ckpt") for other in RUN):
        marks.append(pytest.mark.horovod)
    return marks


@pytest.mark.parametrize("command", [pytest.param(command, marks=run_marks(command)) for command in RUN],
                         ids=lambda command: command.text)
def test_commands_on_the_builtin_data_or_synthetic_input_run_at_tiny_sizes(command, run_command, workdir,
                                                                            monkeypatch, capsys):
    result = main_in_process(monkeypatch, capsys, *command.args) if in_process(command) else run_command(command)
    assert result.returncode == 0, f"{command.text}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if "-h" in command.args:
        assert "usage: trainer.py" in result.stdout
    elif command.subcommand is None:  # a pretraining run: its checkpoint and metrics are there
        out = workdir / command.flag("--out", DEFAULT_OUT)
        assert (out / "metrics.jsonl").is_file() and any(out.glob("checkpoint-*")), sorted(out.iterdir())


@pytest.mark.parametrize("gpus, ranks", [("0", 2), ("1", 1), ("8", 8)])
def test_make_demo_takes_one_rank_per_gpu_and_two_on_a_cpu(gpus, ranks, monkeypatch):
    """GPUS stands for what torch.cuda.device_count() says on a GPU machine (the Makefile asks it when unset). The
    recipe starts its jobs through run/launch.py: the horovodrun command checked is the one the launcher builds."""
    from run.launch import command_line
    result = subprocess.run(["make", "-n", "demo", f"GPUS={gpus}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    words = [shlex.split(line) for line in result.stdout.splitlines() if " -m run.launch " in line]
    monkeypatch.chdir(ROOT)  # the recipe's paths are the root's
    launches = [command_line(line[line.index("run.launch") + 1:])[0] for line in words]
    assert len(launches) == 2, result.stdout
    assert all(command[1] == str(ROOT / "run" / "horovodrun.py") and command[2:7] == ["--gloo", "-np", str(ranks),
                                                                                      "-H", f"localhost:{ranks}"]
               and Path(command[8]).name == "trainer.py" for command in launches), launches
