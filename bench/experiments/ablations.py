"""The paper's ablations on the built-in data, in one resumable command: a table and plots.

    python bench/experiments/ablations.py                    # or: make ablations
    python bench/experiments/ablations.py --only defaults k0 # a subset (names as in VARIANTS)
    python bench/experiments/ablations.py --only defaults random-init k0 k5 --seeds 3 --epochs 12 --knn-every 5  # the claims
    python bench/experiments/ablations.py --study twins      # or: make twins; top-K smoothing with near-duplicates, below

Liu et al. (AAAI 2021) ablate the raw-feature init, the number K of hardest classes that share the smoothing
mass, the mass alpha and the temperature tau. Each variant here is the built-in demo's defaults (`trainer.py`
without --data: MNIST-5k, 4000 unlabelled training images, ResNet-18 of width 16) with one flag changed, trained
for --epochs at P = --np ranks with a kNN monitor every --knn-every epochs (1000 val images, bank = train), then
evaluated linearly (`trainer.py linear`, the demo's protocol). Each variant runs at the seeds 0 .. --seeds - 1
(`trainer.py --seed`: the initialisation, the data order and the augmentations), one run folder OUT/VARIANT/seed-S
each, so that a comparison of two variants is paired by seed: the same seed with and without the technique.

What a seed fixes: on one machine a run is a pure function of its seed (rerun bitwise, tests/test_trainer.py); on
another CPU the same seed gives other numbers (other oneDNN kernels round differently and the runs drift apart), so
across machines only the spread over seeds says how far a number can move.

The twin study (--study twins: its own --out, epochs, kNN epochs and seeds, STUDIES): the paper smooths the K
hardest classes because some are near-duplicates of the image, which the digits hardly have. It runs K 10 (the
defaults) and K 0 on the built-in data without and with 30% twins (`trainer.py --twins 0.3`, data/builtin.py: 1200
of the 4000 train images a second time, lightly changed, as their own instances; val, the kNN bank and the linear
evaluation stay the 4000 originals, so the numbers compare), 3 seeds, the demo's 12 epochs for every variant (a
twin run has 30% more steps per epoch). Its twin runs keep every checkpoint, and bench/experiments/twins.py measures each
one (the twin's rank among the image's classes, within the MECHANISM_K hardest or not, its probability, the
twins' cosines): results.md gets a third table of those numbers per kNN epoch, mean +- std over the seeds.

Resumable: a variant whose linear evaluation is in its metrics.jsonl (and, for a twin run, whose every kNN epoch is
measured) is skipped, one whose pretraining finished goes straight to the linear evaluation, an interrupted one
continues from its newest checkpoint (one every --knn-every epochs). Change --epochs only with another --out. At the
end, from the metrics.jsonl files:
  OUT/results.md   the table: kNN20 every --knn-every epochs, kNN200, linear top-1 and mean loss at the end, as
                   mean +- standard deviation over the seeds; then the paired differences of the CLAIMS whose two
                   variants ran (mean +- standard deviation over the seeds of (with - without), "shown" when the
                   mean exceeds twice that standard deviation); with the machine, the date and the commit;
  OUT/results.json every seed's numbers, per variant;
  OUT/knn.png      kNN20 vs epoch, one panel per ablated setting (the defaults in every panel): each variant's mean
                   over the seeds with a +-1 standard deviation band;
  OUT/loss.png     mean training loss vs epoch, the same panels;
  OUT/VARIANT/seed-S/twins-mechanism.json  a twin run's mechanism numbers (bench/experiments/twins.py).
--trainer-flags adds flags to every pretraining run (a smaller network for a quick check of the runner; the
table's first line names them); --np 1 runs the trainer as one process, without horovodrun.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from bench.harness import provenance  # noqa: E402
from bench.experiments.twins import MECHANISM_FILE, SUMMARY  # noqa: E402
from run.launch import launch  # noqa: E402

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
    "twins-k10": (["--twins", "0.3"], "K, 30% twins", "K 10, 30% twins"),
    "twins-k0": (["--twins", "0.3", "--smooth-k", "0"], "K, 30% twins", "K 0, 30% twins"),
}
# study: its variants, plot panels (one per ablated setting, in this order) and defaults of the flags below
STUDIES = {
    "ablations": dict(variants=[name for name in VARIANTS if not name.startswith("twins")],
                      panels=["initialisation", "K", "alpha", "tau"], out="runs/ablations", epochs=10, knn_every=2,
                      seeds=1),
    "twins": dict(variants=["defaults", "k0", "twins-k10", "twins-k0"], panels=["K", "K, 30% twins"],
                  out="runs/twins", epochs=12, knn_every=5, seeds=3),
}
MECHANISM_K = 10  # "among the K hardest" of bench/experiments/twins.py: the K of the smoothed twin variant, for both
MECHANISM_DIGITS = {"twin_probability_median": 4, "own_probability_median": 4, "cosine_head_median": 3,
                    "cosine_pooled_median": 3, "nearest_other_median": 3}  # decimals; 1 for the others
# The paper's claims as paired comparisons: (claim, the variant with the technique, the one without); a pair of
# variants (a, b) in either place stands for a - b at the same seed (a difference of differences).
CLAIMS = [("raw-feature init beats random init", "defaults", "random-init"),
          ("K 10 beats K 0 (plain cross-entropy)", "defaults", "k0"),
          ("K 5 beats K 0", "k5", "k0"),
          ("K 10 beats K 5", "defaults", "k5"),
          ("K 10 beats K 0 with 30% twins", "twins-k10", "twins-k0"),
          ("K 10 gains more over K 0 with 30% twins than without", ("twins-k10", "twins-k0"), ("defaults", "k0"))]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--study", default="ablations", choices=sorted(STUDIES), help="which study: its variants and "
                    "the defaults of the four flags below (default: ablations)")
parser.add_argument("--out", help="output folder: one run folder per variant, the table and the plots "
                    "(default: runs/ablations; runs/twins for the twin study)")
parser.add_argument("--epochs", type=int, help="pretraining epochs per variant (default: 10; 12 twins)")
parser.add_argument("--knn-every", type=int, help="epochs between kNN monitors and checkpoints (default: 2; 5 twins)")
parser.add_argument("--seeds", type=int, help="runs per variant, at trainer seeds 0 .. N-1 (default: 1; 3 twins)")
parser.add_argument("--np", type=int, default=2, help="Horovod ranks per run; 1 = one process, no horovodrun "
                    "(default: 2)")
parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only (default: the "
                    "study's)")
parser.add_argument("--trainer-flags", default="", help="flags added to every pretraining run, one string, e.g. "
                    "--trainer-flags='--width 8' (default: none)")


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


def run(command, environment, log):
    """Run a launch() of the trainer with its output appended to `log`; stop the study if it fails."""
    with log.open("a") as stream:
        result = subprocess.run(command, cwd=ROOT, env=environment, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} exited {result.returncode}; see {log}")


def run_folder(out, name, seed):
    return Path(out) / name / f"seed-{seed}"


def has_twins(name):
    return "--twins" in VARIANTS[name][0]


def read_mechanism(run):
    """{epoch: bench/experiments/twins.py's summary} of a twin run at MECHANISM_K; {} before it was measured."""
    path = run / MECHANISM_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {int(epoch): summary for epoch, summary in saved.items() if summary.get("k") == MECHANISM_K}


def run_variant(name, seed, args):
    """Pretrain and evaluate one variant at one seed unless its folder says it is done; returns the seconds spent."""
    out, started = run_folder(args.out, name, seed), time.perf_counter()

    def trainer(*argv):  # one intra-op thread per rank
        return launch("single" if args.np == 1 else "horovod", args.np, ROOT / "trainer.py", *argv,
                      env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    label = f"{name} seed {seed}"
    measured = not has_twins(name) or set(monitored_epochs(args.epochs, args.knn_every)) <= set(read_mechanism(out))
    if linear_result(read_metrics(out)) and measured:
        print(f"{label}: done, skipped")
        return 0.0
    out.mkdir(parents=True, exist_ok=True)
    if not (out / f"checkpoint-{args.epochs:04d}").is_dir():
        print(f"{label}: pretraining {args.epochs} epochs ({' '.join(VARIANTS[name][0]) or 'the defaults'})",
              flush=True)
        # A twin run keeps the checkpoint of every kNN epoch: bench/experiments/twins.py measures each.
        keep = ["--keep-checkpoints", "0"] if has_twins(name) else []
        run(*trainer("--out", out, "--epochs", args.epochs, "--knn-every", args.knn_every, "--save-every",
                     args.knn_every, "--seed", seed, *keep, *shlex.split(args.trainer_flags), *VARIANTS[name][0]),
            out / "ablation.log")
    if not linear_result(read_metrics(out)):
        print(f"{label}: linear evaluation", flush=True)
        run(*trainer("linear", "--ckpt", out), out / "ablation.log")
    if not measured:
        print(f"{label}: twins' mechanism (bench/experiments/twins.py)", flush=True)
        run(*launch("single", 1, ROOT / "bench" / "experiments" / "twins.py", out, "--k", MECHANISM_K,
                    env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}), out / "ablation.log")
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.0f} s", flush=True)
    return seconds


def monitored_epochs(epochs, knn_every):
    """The epochs with a kNN monitor: every knn_every, and the last."""
    monitored = list(range(knn_every, epochs + 1, knn_every))
    return monitored if monitored and monitored[-1] == epochs else [*monitored, epochs]


def collect(out, names, seeds, epochs, knn_every):
    """{variant: {seed: {column: value}}} of the seeds whose run reached each column; columns as in the table."""
    results = {}
    for name in names:
        for seed in range(seeds):
            metrics = read_metrics(run_folder(out, name, seed))
            knn20, knn200 = per_epoch(metrics, "knn20_top1"), per_epoch(metrics, "knn200_top1")
            loss, linear = per_epoch(metrics, "epoch_loss"), linear_result(metrics) or {}
            numbers = {f"kNN20 ep {e}": knn20[e] for e in monitored_epochs(epochs, knn_every) if e in knn20}
            numbers.update({"kNN200": knn200.get(epochs), "linear top-1": linear.get("pretrained/linear_top1"),
                            "loss (last epoch)": loss.get(epochs)})
            results.setdefault(name, {})[seed] = {key: value for key, value in numbers.items() if value is not None}
    return results


def spread(values, digits):
    """'mean +- std' over the seeds (sample standard deviation), the value alone for one seed, '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def claim_value(results, side, seed, column):
    """A claim's side at one seed: the variant's value, a - b for a pair (a, b) of sides; None where one is missing."""
    if isinstance(side, tuple):
        first, second = (claim_value(results, part, seed, column) for part in side)
        return None if first is None or second is None else first - second
    return results.get(side, {}).get(seed, {}).get(column)


def paired_differences(results, column):
    """{claim: [with - without] per seed that both sides reached}, for the claims whose variants ran."""
    differences = {}
    seeds = sorted({seed for runs in results.values() for seed in runs})
    for claim, with_it, without in CLAIMS:
        values = [(claim_value(results, with_it, seed, column), claim_value(results, without, seed, column))
                  for seed in seeds]
        pairs = [first - second for first, second in values if first is not None and second is not None]
        if pairs:
            differences[claim] = pairs
    return differences


def verdict(pairs):
    """A difference is shown when its mean over the paired seeds exceeds twice their standard deviation."""
    if len(pairs) < 2:
        return "one seed: not judged"
    mean, deviation = statistics.mean(pairs), statistics.stdev(pairs)
    return "shown" if mean > 2 * deviation else "not shown"


def table(out, names, epochs, knn_every, seeds=1, trainer_flags=""):
    """The results as a markdown table (also printed), results.json with every seed's numbers; the twin runs'
    mechanism numbers below when there are any."""
    results = collect(out, names, seeds, epochs, knn_every)
    columns = [f"kNN20 ep {e}" for e in monitored_epochs(epochs, knn_every)] + ["kNN200", "linear top-1",
                                                                                 "loss (last epoch)"]
    statistic = "mean +- std over seeds 0.." + str(seeds - 1) if seeds > 1 else "seed 0"
    added = f"; trainer flags added to every run: {trainer_flags}" if trainer_flags else ""
    lines = [f"Ablations on the built-in data, {epochs} epochs, {statistic}{added}; {provenance()}", "",
             "| variant | flags | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for name in names:
        runs = results[name].values()
        cells = [spread([run[column] for run in runs if column in run], 3 if column.startswith("loss") else 1)
                 for column in columns]
        finished = sum("linear top-1" in run for run in runs)
        lines.append(f"| {name} | {' '.join(VARIANTS[name][0]) or '-'} | {finished} | " + " | ".join(cells) + " |")
    claims = {column: paired_differences(results, column) for column in columns if not column.startswith("loss")}
    if any(claims.values()):
        lines += ["", "Paired by seed: mean +- std over the seeds of (with - without), in points; shown = the mean "
                  "exceeds twice the standard deviation.", "",
                  "| claim | " + " | ".join(column for column in claims) + " |", "|---" * (len(claims) + 1) + "|"]
        for claim, _, _ in CLAIMS:
            cells = [f"{spread(claims[column][claim], 1)} ({verdict(claims[column][claim])})"
                     if claim in claims[column] else "-" for column in claims]
            if any(cell != "-" for cell in cells):
                lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += mechanism_table(out, [name for name in names if has_twins(name)], seeds, epochs, knn_every)
    text = "\n".join(lines) + "\n"
    (Path(out) / "results.md").write_text(text)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


def mechanism_table(out, names, seeds, epochs, knn_every):
    """The lines of the twin runs' mechanism table (bench/experiments/twins.py), per variant and kNN epoch: mean +- std over
    the seeds measured; [] before any was."""
    rows, pairs = [], set()
    for name in names:
        by_seed = [read_mechanism(run_folder(out, name, seed)) for seed in range(seeds)]
        for epoch in monitored_epochs(epochs, knn_every):
            summaries = [measured[epoch] for measured in by_seed if epoch in measured]
            if summaries:
                pairs.update(summary["pairs"] for summary in summaries)
                cells = [spread([summary[key] for summary in summaries], MECHANISM_DIGITS.get(key, 1))
                         for key in SUMMARY]
                rows.append(f"| {name} | {epoch} | {len(summaries)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    columns = [column.replace(" K ", f" {MECHANISM_K} ") for column in SUMMARY.values()]
    return ["", f"Twins' mechanism (bench/experiments/twins.py), from each kNN epoch's checkpoint, over the "
            f"{'/'.join(map(str, sorted(pairs)))} pairs (image, its twin): the twin's rank among the image's other "
            f"classes by the image's head-feature logits (1 = the hardest), its softmax probability, the cosines of "
            f"the twins' normalized head outputs and pooled backbone features; medians and shares per run, then "
            f"mean +- std over the seeds.", "",
            "| variant | epoch | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|", *rows]


def plots(out, names, seeds=1, panels=STUDIES["ablations"]["panels"]):
    """knn.png and loss.png: one panel per ablated setting, each with the defaults and that setting's variants;
    a variant's line is its mean over the seeds that reached the epoch, its band +-1 standard deviation."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    for key, label, filename in (("knn20_top1", "kNN20 top-1 (%)", "knn.png"),
                                 ("epoch_loss", "mean training loss", "loss.png")):
        figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True, squeeze=False)
        for axis, setting in zip(axes[0], panels):
            for name in names:
                flags, ablates, legend = VARIANTS[name]
                by_epoch = {}
                for seed in range(seeds):
                    for epoch, value in per_epoch(read_metrics(run_folder(out, name, seed)), key).items():
                        by_epoch.setdefault(epoch, []).append(value)
                if not by_epoch or ablates not in (None, setting):
                    continue
                epochs = sorted(by_epoch)
                means = [statistics.mean(by_epoch[e]) for e in epochs]
                deviations = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
                line, = axis.plot(epochs, means, marker="o", markersize=3, label=legend if ablates else "defaults",
                                  linewidth=2.5 if ablates is None else 1.5, color="black" if ablates is None else None)
                axis.fill_between(epochs, [m - d for m, d in zip(means, deviations)],
                                  [m + d for m, d in zip(means, deviations)], color=line.get_color(), alpha=0.15)
            axis.set_title(setting)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        axes[0][0].set_ylabel(label)
        figure.tight_layout()
        figure.savefig(Path(out) / filename, dpi=80)
        plt.close(figure)


def main():
    args = parser.parse_args()
    study = STUDIES[args.study]
    for name in ("out", "epochs", "knn_every", "seeds"):
        if getattr(args, name) is None:
            setattr(args, name, study[name])
    if args.epochs <= 0 or args.knn_every <= 0 or args.np <= 0 or args.seeds <= 0:
        sys.exit("error: --epochs, --knn-every, --np and --seeds must be positive")
    names = args.only or study["variants"]
    # Seed-major order: an interrupted study has every variant at the first seeds, so its pairs are complete.
    seconds = sum(run_variant(name, seed, args) for seed in range(args.seeds) for name in names)
    print(f"ran for {seconds / 60:.1f} min")
    table(args.out, names, args.epochs, args.knn_every, args.seeds, args.trainer_flags)
    plots(args.out, names, args.seeds, study["panels"])
    print(f"wrote {Path(args.out) / 'results.md'}, results.json, knn.png and loss.png")


if __name__ == "__main__":
    main()
