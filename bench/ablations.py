"""The paper's ablations on the built-in data, in one resumable command: a table and plots.

    python bench/ablations.py                    # or: make ablations
    python bench/ablations.py --only defaults k0 # a subset (names as in VARIANTS)

Liu et al. (AAAI 2021) ablate the raw-feature init, the number K of hardest classes that share the smoothing
mass, the mass alpha and the temperature tau. Each variant here is the built-in demo's defaults (`trainer.py`
without --data: MNIST-5k, 4000 unlabelled training images, ResNet-18 of width 16) with one flag changed, trained
for --epochs at P = --np ranks with a kNN monitor every --knn-every epochs (1000 val images, bank = train), then
evaluated linearly (`trainer.py linear`, the demo's protocol). Every variant starts from the same seed.

Resumable: a variant whose linear evaluation is in its metrics.jsonl is skipped, one whose pretraining finished
goes straight to the linear evaluation, an interrupted one continues from its newest checkpoint (one every
--knn-every epochs). Change --epochs only with another --out. At the end, from the metrics.jsonl files:
  OUT/results.md   the table: kNN20 every --knn-every epochs, kNN200, linear top-1 and mean loss at the end;
                   with the machine, the date and the commit;
  OUT/knn.png      kNN20 vs epoch, one panel per ablated setting (the defaults in every panel);
  OUT/loss.png     mean training loss vs epoch, the same panels.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (the flags that differ from the defaults, the setting it ablates, its value in the plots' legends)
VARIANTS = {
    "defaults": ([], None, "defaults: raw init, K 10, alpha 0.1, tau 0.1"),
    "random-init": (["--no-raw-init"], "initialisation", "random init"),
    "k0": (["--smooth-k", "0"], "K", "K 0"),
    "k1": (["--smooth-k", "1"], "K", "K 1"),
    "k5": (["--smooth-k", "5"], "K", "K 5"),
    "alpha0.2": (["--smooth-alpha", "0.2"], "alpha", "alpha 0.2"),
    "alpha0.5": (["--smooth-alpha", "0.5"], "alpha", "alpha 0.5"),
    "tau0.15": (["--temperature", "0.15"], "tau", "tau 0.15"),
    "tau0.2": (["--temperature", "0.2"], "tau", "tau 0.2"),
}
SETTINGS = ["initialisation", "K", "alpha", "tau"]  # one plot panel each, in this order

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="runs/ablations", help="output folder: one run folder per variant, the "
                    "table and the plots (default: runs/ablations)")
parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs per variant (default: 10)")
parser.add_argument("--knn-every", type=int, default=2, help="epochs between kNN monitors and checkpoints "
                    "(default: 2)")
parser.add_argument("--np", type=int, default=2, help="Horovod ranks per run (default: 2)")
parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only (default: all)")


def read_metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def per_epoch(metrics, key):
    """{epoch: value} of the records that carry `key`; a resumed epoch's later record wins."""
    return {record["epoch"]: record[key] for record in metrics if key in record and "step" not in record}


def linear_result(metrics):
    """The last linear evaluation's pretrained metrics, or None."""
    evaluations = [record for record in metrics if "pretrained/linear_top1" in record]
    return evaluations[-1] if evaluations else None


def run(command, log):
    """Run a trainer command with its output appended to `log`; stop the study if it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one intra-op thread per rank
    with log.open("a") as stream:
        result = subprocess.run(command, cwd=ROOT, env=environment, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} exited {result.returncode}; see {log}")


def run_variant(name, args):
    """Pretrain and evaluate one variant unless its folder says it is done; returns the seconds spent."""
    out, started = Path(args.out) / name, time.perf_counter()
    python = Path(sys.executable)
    horovod = [python.parent / "horovodrun", "--gloo", "-np", str(args.np), "-H", f"localhost:{args.np}", python]
    if linear_result(read_metrics(out)):
        print(f"{name}: done, skipped")
        return 0.0
    out.mkdir(parents=True, exist_ok=True)
    if not (out / f"checkpoint-{args.epochs:04d}").is_dir():
        print(f"{name}: pretraining {args.epochs} epochs ({' '.join(VARIANTS[name][0]) or 'the defaults'})", flush=True)
        run([*horovod, ROOT / "trainer.py", "--out", out, "--epochs", str(args.epochs), "--knn-every",
             str(args.knn_every), "--save-every", str(args.knn_every), *VARIANTS[name][0]], out / "ablation.log")
    print(f"{name}: linear evaluation", flush=True)
    run([*horovod, ROOT / "trainer.py", "linear", "--ckpt", out], out / "ablation.log")
    seconds = time.perf_counter() - started
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def provenance():
    """'machine, date, commit' of the table."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if git("status", "--porcelain",
                                                                                  "--untracked-files=no") else "")
    machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    return f"machine {machine}; {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; commit {commit}"


def table(out, names, epochs, knn_every):
    """The results as a markdown table (also printed)."""
    monitored = [epoch for epoch in range(knn_every, epochs + 1, knn_every)] or [epochs]
    if monitored[-1] != epochs:
        monitored.append(epochs)
    lines = [f"Ablations on the built-in data, {epochs} epochs; {provenance()}", "",
             "| variant | flags | " + " | ".join(f"kNN20 ep {e}" for e in monitored)
             + " | kNN200 | linear top-1 | loss (last epoch) |",
             "|---" * (len(monitored) + 5) + "|"]
    for name in names:
        metrics = read_metrics(Path(out) / name)
        knn20, knn200 = per_epoch(metrics, "knn20_top1"), per_epoch(metrics, "knn200_top1")
        loss, linear = per_epoch(metrics, "epoch_loss"), linear_result(metrics) or {}
        cells = [f"{knn20[e]:.1f}" if e in knn20 else "-" for e in monitored]
        cells += [f"{knn200[epochs]:.1f}" if epochs in knn200 else "-",
                  f"{linear['pretrained/linear_top1']:.1f}" if linear else "-",
                  f"{loss[epochs]:.3f}" if epochs in loss else "-"]
        lines.append(f"| {name} | {' '.join(VARIANTS[name][0]) or '-'} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (Path(out) / "results.md").write_text(text)
    print(text)


def plots(out, names):
    """knn.png and loss.png: one panel per ablated setting, each with the defaults and that setting's variants."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    for key, label, filename in (("knn20_top1", "kNN20 top-1 (%)", "knn.png"),
                                 ("epoch_loss", "mean training loss", "loss.png")):
        figure, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 3.4), sharey=True)
        for axis, setting in zip(axes, SETTINGS):
            for name in names:
                flags, ablates, legend = VARIANTS[name]
                curve = sorted(per_epoch(read_metrics(Path(out) / name), key).items())
                if curve and ablates in (None, setting):
                    axis.plot(*zip(*curve), marker="o", markersize=3, label=legend if ablates else "defaults",
                              linewidth=2.5 if ablates is None else 1.5, color="black" if ablates is None else None)
            axis.set_title(setting)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        axes[0].set_ylabel(label)
        figure.tight_layout()
        figure.savefig(Path(out) / filename, dpi=80)
        plt.close(figure)


def main():
    args = parser.parse_args()
    if args.epochs <= 0 or args.knn_every <= 0 or args.np <= 0:
        sys.exit("error: --epochs, --knn-every and --np must be positive")
    names = args.only or list(VARIANTS)
    seconds = sum(run_variant(name, args) for name in names)
    print(f"ran for {seconds / 60:.1f} min")
    table(args.out, names, args.epochs, args.knn_every)
    plots(args.out, names)
    print(f"wrote {Path(args.out) / 'results.md'}, knn.png and loss.png")


if __name__ == "__main__":
    main()
