"""The one launcher of multi-rank jobs (tests, bench scripts, the Makefile): the command line and environment that
start `script argv` under an engine at a number of ranks.

  horovod  horovodrun --gloo -np RANKS -H HOSTS python script argv   (HOSTS: localhost:RANKS unless given)
  torch    torchrun --standalone --nproc_per_node RANKS script argv, or with nodes= one agent of a c10d
           rendezvous at rendezvous= (--nnodes NODES --rdzv-backend c10d --rdzv-endpoint ... --rdzv-id ...)
  single   python script argv: one process, no launcher (ranks must be 1)

The launchers are the ones beside the interpreter (a virtual environment's bin/), so no PATH is needed. Command
line, for the Makefile and shell scripts (it replaces itself with the job, whose exit status is its own):

    python -m run.launch --engine horovod --ranks 2 -- trainer.py --out runs/demo

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
    launchers = Path(python).parent
    job = [str(script), *map(str, argv)]
    if engine == "horovod":
        command = [str(launchers / "horovodrun"), "--gloo", "-np", str(ranks), "-H", hosts or f"localhost:{ranks}",
                   str(python), *job]
    elif engine == "torch":
        if nodes is None:
            placement = ["--standalone"]
        else:
            placement = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous,
                         "--rdzv-id", rendezvous_id]
            if rendezvous_conf:
                placement += ["--rdzv-conf", ",".join(f"{key}={value}" for key, value in rendezvous_conf.items())]
        restarts = ["--max-restarts", str(max_restarts)] if max_restarts else []
        command = [str(launchers / "torchrun"), *placement, "--nproc_per_node", str(ranks), *restarts,
                   *(["--tee", "3"] if tee else []), *job]
    else:
        command = [str(python), *job]
    environment = {**os.environ, **(env or {})}
    return command, {name: value for name, value in environment.items() if value is not None}


def main(arguments=None):
    parser = argparse.ArgumentParser(prog="python -m run.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, choices=ENGINES, help="the launcher: horovodrun, torchrun, none")
    parser.add_argument("--ranks", type=int, default=1, help="ranks (torch with --nodes: this agent's) (default: 1)")
    parser.add_argument("--hosts", help="horovodrun's -H (default: localhost:RANKS)")
    parser.add_argument("--nodes", help="torchrun's --nnodes, with --rendezvous (default: one standalone agent)")
    parser.add_argument("--rendezvous", help="the c10d rendezvous endpoint host:port of a job of --nodes agents")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun's --max-restarts (default: 0)")
    parser.add_argument("--tee", action="store_true", help="torchrun --tee 3: workers' output prefixed by rank")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="-- script [argv ...]")
    args = parser.parse_args(arguments)
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        parser.error("no script: python -m run.launch --engine ENGINE --ranks N -- script [argv ...]")
    if (args.nodes is None) != (args.rendezvous is None):
        parser.error("--nodes and --rendezvous go together (one agent of a multi-node torchrun job)")
    try:
        command, environment = launch(args.engine, args.ranks, *job, hosts=args.hosts, nodes=args.nodes,
                                      rendezvous=args.rendezvous, max_restarts=args.max_restarts, tee=args.tee)
    except ValueError as error:
        parser.error(str(error))
    sys.stdout.flush()
    os.execve(command[0], command, environment)


if __name__ == "__main__":
    main()
