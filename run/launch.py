"""The one launcher of multi-rank jobs (tests, bench scripts, the Makefile): the command line and environment that
start `script argv` under an engine at a number of ranks.

  horovod  horovodrun --gloo -np RANKS -H HOSTS python script argv   (HOSTS: localhost:RANKS unless given), as
           run/horovodrun.py: horovodrun's own code, its build check remembered instead of asked per job
  torch    python -m torch.distributed.run (torchrun) --standalone --nproc_per_node RANKS script argv, or with
           nodes= one agent of a c10d rendezvous at rendezvous= (--nnodes NODES --rdzv-backend c10d
           --rdzv-endpoint ... --rdzv-id ...)
  single   python script argv: one process, no launcher (ranks must be 1)

Both launchers run under the interpreter (horovodrun as run/horovodrun.py, torchrun as its module), so no PATH is
needed. Command line, for the Makefile and shell scripts: the launcher's options, then ENGINE RANKS SCRIPT and the
script's own arguments, passed on untouched (an option after SCRIPT is the script's). It replaces itself with the
job, whose exit status is its own:

    python -m run.launch horovod 2 trainer.py --out runs/demo
    python -m run.launch --max-restarts 3 torch 2 trainer.py --engine torch
    python -m run.launch single 1 bench/train_step.py cpu --engine horovod

It imports nothing beyond the standard library: starting a job costs no torch import."""
import argparse
import os
import sys
from pathlib import Path

ENGINES = ("horovod", "torch", "single")


def launch(engine, ranks, script, *argv, hosts=None, nodes=None, rendezvous=None, rendezvous_id="job",
           rendezvous_conf=None, max_restarts=0, tee=False, env=None, python=sys.executable):
    """(command, environment) of `python script argv` as `ranks` ranks of `engine` (module docstring).

    hosts: horovodrun's -H ("localhost:1,127.0.0.1:1": two "nodes" on this machine). nodes, rendezvous,
    rendezvous_id, rendezvous_conf: this torchrun agent's place in a multi-agent job (--nnodes "2" or "1:2",
    the c10d endpoint "host:port", its id, and --rdzv-conf entries such as {"is_host": 1}); ranks is then the
    agent's own workers. max_restarts: torchrun's --max-restarts. tee: torchrun --tee 3, every worker's output
    relayed prefixed "[defaultR]:". env: entries over this process's environment; None unsets one."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    if ranks < 1 or (engine == "single" and ranks != 1):
        raise ValueError(f"{ranks} ranks under engine {engine}: a positive number, 1 for single")
    job = [str(script), *map(str, argv)]
    if engine == "horovod":
        command = [str(python), str(Path(__file__).with_name("horovodrun.py")), "--gloo", "-np", str(ranks),
                   "-H", hosts or f"localhost:{ranks}", str(python), *job]
    elif engine == "torch":
        if nodes is None:
            placement = ["--standalone"]
        else:
            placement = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous,
                         "--rdzv-id", rendezvous_id]
            if rendezvous_conf:
                placement += ["--rdzv-conf", ",".join(f"{key}={value}" for key, value in rendezvous_conf.items())]
        restarts = ["--max-restarts", str(max_restarts)] if max_restarts else []
        # torchrun's own module: no `torchrun` script on PATH or beside the interpreter needed.
        command = [str(python), "-m", "torch.distributed.run", *placement, "--nproc_per_node", str(ranks), *restarts,
                   *(["--tee", "3"] if tee else []), *job]
    else:
        command = [str(python), *job]
    environment = {**os.environ, **(env or {})}
    return command, {name: value for name, value in environment.items() if value is not None}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage is a --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (--help for the usage)\n")


parser = OneLineParser(prog="python -m run.launch", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--hosts", help="horovod: horovodrun's -H, host:slots,... (default: localhost:RANKS)")
parser.add_argument("--nodes", help="torch: torchrun's --nnodes, N or MIN:MAX, with --rendezvous (default: one "
                    "standalone agent)")
parser.add_argument("--rendezvous", help="torch: the c10d rendezvous endpoint host:port of a job of --nodes agents")
parser.add_argument("--max-restarts", type=int, default=0, help="torch: torchrun's --max-restarts (default: 0)")
parser.add_argument("--tee", action="store_true", help="torch: every worker's output prefixed by its local rank "
                    "(default: off)")
parser.add_argument("engine", choices=ENGINES, metavar="ENGINE", help="horovod (horovodrun), torch (torchrun) or "
                    "single (one plain process)")
parser.add_argument("ranks", type=int, metavar="RANKS", help="processes (torch with --nodes: this agent's); 1 for "
                    "single")
parser.add_argument("script", metavar="SCRIPT", help="the Python script every rank runs")
parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="...", help="the script's arguments")

TORCH_ONLY = {"nodes": "--nodes", "rendezvous": "--rendezvous", "max_restarts": "--max-restarts", "tee": "--tee"}


def command_line(arguments):
    """(command, environment) of the launcher's command line `arguments`; a one-line error on bad input."""
    args = parser.parse_args(arguments)
    given = [flag for name, flag in TORCH_ONLY.items() if getattr(args, name)]
    if args.engine != "torch" and given:
        parser.error(f"{', '.join(given)}: torchrun's, not engine {args.engine}'s")
    if args.engine != "horovod" and args.hosts is not None:
        parser.error(f"--hosts: horovodrun's, not engine {args.engine}'s")
    if (args.nodes is None) != (args.rendezvous is None):
        parser.error("--nodes and --rendezvous go together (one agent of a multi-node torchrun job)")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if not Path(args.script).is_file():
        parser.error(f"no script {args.script}")
    try:
        return launch(args.engine, args.ranks, args.script, *args.argv, hosts=args.hosts, nodes=args.nodes,
                      rendezvous=args.rendezvous, max_restarts=args.max_restarts, tee=args.tee)
    except ValueError as error:
        parser.error(str(error))


def main(arguments=None):
    command, environment = command_line(arguments)
    sys.stdout.flush()
    os.execve(command[0], command, environment)


if __name__ == "__main__":
    main()
