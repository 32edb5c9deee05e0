"""What top-K smoothing does to near-duplicates, measured from the checkpoints of a run with --twins.

    python bench/experiments/twins.py RUN            # every epoch checkpoint of RUN: RUN/twins-mechanism.json and a table
    python bench/experiments/twins.py RUN --k 10     # the K of "among the K hardest" (default: 10, the built-in K)

Liu et al. (AAAI 2021) smooth the labels of the K hardest classes because some of them are near-duplicates of
the image, which plain cross-entropy pushes away as hard as any negative. The trainer's --twins (data/builtin.py)
plants such pairs: image a, and its twin b as its own instance (class b of the classifier). For each pair and each
checkpoint-NNNN of the run (the trainer writes one every --save-every epochs; bench/experiments/ablations.py keeps those of
its kNN epochs), with the checkpoint's encoder in eval mode on each image's evaluation view (resize and center
crop, as the raw-feature init and the kNN monitor see it) and its classifier rows W:

    h_a = the head output (the classifier's input), g_a = the pooled backbone feature (the kNN monitor's)
    z_aj = <h_a / |h_a|, W_j / |W_j|> / tau                  the image's logits over all N classes (tau: the run's)
    rank = 1 + #{j not in {a, b}: z_aj > z_ab or (z_aj = z_ab and j < b)}
                                                             the twin's place among a's other classes, 1 = the
                                                             hardest; b is among the K classes the smoothing
                                                             targets (kernels/reference.py: T_a) iff rank <= K
    twin probability = exp(z_ab - logsumexp_j z_aj),  own probability = exp(z_aa - logsumexp_j z_aj)
    cosine head = cos(h_a, h_b),  cosine pooled = cos(g_a, g_b)
    nearest other = max_{j not in {a, b}} cos(h_a, h_j)      the scale of the head cosine: is the twin closer
                                                             than the image's nearest other image?

The image a is the original, the twin's row is the class ranked (one direction per pair). Summarised per epoch
(SUMMARY): the median rank, the share of pairs whose twin is among the K hardest and the hardest, and the medians
of the probabilities and cosines. A checkpoint already summarised in the file at the same K is not measured again.
The measure reads checkpoints only: the training step has no collective for it.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from data.builtin import read_twins  # noqa: E402
from data.loaders import eval_loader  # noqa: E402
from data.run_index import load_index  # noqa: E402
from kernels.reference import normalize_rows  # noqa: E402
from model.encoder import build_encoder  # noqa: E402
from run import layout  # noqa: E402
from run.checkpoint import load_rows, load_state  # noqa: E402
from run.distributed import exit_now, start  # noqa: E402
from run.errors import UsageError  # noqa: E402

MECHANISM_FILE = "twins-mechanism.json"  # in the run directory
# name in the file: the column the tables give it (with K for its value)
SUMMARY = {"rank_median": "twin's rank (median)", "within_k": "twin among the K hardest (%)",
           "hardest": "twin is the hardest (%)", "twin_probability_median": "twin's probability (median)",
           "own_probability_median": "own probability (median)", "cosine_head_median": "cosine, head (median)",
           "cosine_pooled_median": "cosine, pooled (median)",
           "nearest_other_median": "cosine, head, nearest other image (median)"}
EVAL_BATCH = 256

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("run", help="run directory of a pretraining run with --twins")
parser.add_argument("--k", type=int, default=10, help="K of 'among the K hardest' (default: 10)")


def twin_pairs(train_index):
    """(original ids [P], twin ids [P]) of the run's train index, from the pairs its dataset records."""
    ids = {name: instance for instance, name in enumerate(train_index.files)}
    pairs = read_twins(train_index.root.parent)
    return (torch.tensor([ids[pair["original"]] for pair in pairs]),
            torch.tensor([ids[pair["twin"]] for pair in pairs]))


@torch.no_grad()
def encoded(backbone, head, loader, num_instances):
    """(normalized pooled features [N, C], normalized head outputs [N, D]) of every instance, in id order."""
    pooled = head_out = None
    for images, ids in loader:
        features = backbone(images)
        outputs = head(features)
        if pooled is None:
            pooled = features.new_zeros(num_instances, features.shape[1])
            head_out = outputs.new_zeros(num_instances, outputs.shape[1])
        pooled[ids], head_out[ids] = normalize_rows(features.float()), normalize_rows(outputs.float())
    return pooled, head_out


def pair_measures(logits, originals, twins):
    """{rank, twin_probability, own_probability} per pair [P] from the originals' logits over all classes [P, N]."""
    rows = torch.arange(len(originals))
    twin_logit = logits[rows, twins]
    log_normaliser = logits.logsumexp(dim=1)
    others = logits.clone()
    others[rows, originals] = float("-inf")  # the image's own class is not one of its negatives
    classes = torch.arange(logits.shape[1])
    ahead = (others > twin_logit[:, None]) | ((others == twin_logit[:, None]) & (classes[None] < twins[:, None]))
    return {"rank": 1 + ahead.sum(dim=1), "twin_probability": (twin_logit - log_normaliser).exp(),
            "own_probability": (logits[rows, originals] - log_normaliser).exp()}


def measure(checkpoint, train_index, pairs, k):
    """The summary (SUMMARY's names) of one checkpoint's twins."""
    state = load_state(checkpoint)
    config = argparse.Namespace(**state["config"])
    device = torch.device("cpu")
    backbone, head = build_encoder(config, device)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    backbone.eval()
    head.eval()
    num_instances = train_index.num_instances
    weight, _, _ = load_rows(checkpoint, 0, num_instances, num_instances, state)  # [N, D], every shard
    pooled, head_out = encoded(backbone, head, eval_loader(train_index, config, EVAL_BATCH), num_instances)
    originals, twins = pairs
    logits = head_out[originals] @ normalize_rows(weight.float()).T / config.temperature  # [P, N]
    measures = pair_measures(logits, originals, twins)
    cosines = head_out[originals] @ head_out.T  # [P, N]
    cosines[torch.arange(len(originals))[:, None], torch.stack([originals, twins], dim=1)] = float("-inf")
    rank = measures["rank"].double()
    return {"pairs": len(originals), "k": k, "rank_median": rank.median().item(),
            "within_k": 100 * (rank <= k).double().mean().item(), "hardest": 100 * (rank == 1).double().mean().item(),
            "twin_probability_median": measures["twin_probability"].median().item(),
            "own_probability_median": measures["own_probability"].median().item(),
            "cosine_head_median": (head_out[originals] * head_out[twins]).sum(dim=1).median().item(),
            "cosine_pooled_median": (pooled[originals] * pooled[twins]).sum(dim=1).median().item(),
            "nearest_other_median": cosines.max(dim=1).values.median().item()}


def measure_run(run, k, log=print):
    """{epoch: summary} of every epoch checkpoint of `run`, written to run/MECHANISM_FILE (one-line errors)."""
    run = Path(run)
    config_file = run / layout.CONFIG
    if not config_file.is_file() or not json.loads(config_file.read_text()).get("twins"):
        raise UsageError(f"{run} is not a run with --twins (no {layout.CONFIG} with twins > 0)")
    if k <= 0:
        raise UsageError(f"--k must be positive, got {k}")
    checkpoints = [path for path in layout.complete_checkpoints(run) if layout.checkpoint_position(path)[1] == 0]
    if not checkpoints:
        raise UsageError(f"{run} has no epoch checkpoint (checkpoint-NNNN)")
    saved = json.loads((run / MECHANISM_FILE).read_text()) if (run / MECHANISM_FILE).is_file() else {}
    summaries = {epoch: summary for epoch, summary in saved.items() if summary.get("k") == k}
    train_index = load_index(layout.index_dir(run, "train"))
    pairs = twin_pairs(train_index)
    for checkpoint in checkpoints:
        epoch = str(layout.checkpoint_position(checkpoint)[0])
        if epoch not in summaries:
            summaries[epoch] = measure(checkpoint, train_index, pairs, k)
            log(f"{checkpoint}: " + ", ".join(f"{name} {summaries[epoch][name]:.4g}" for name in SUMMARY))
    summaries = dict(sorted(summaries.items(), key=lambda item: int(item[0])))
    (run / MECHANISM_FILE).write_text(json.dumps(summaries, indent=1) + "\n")
    return summaries


def main():
    args = parser.parse_args()
    try:
        start("single", announce=False)
        summaries = measure_run(args.run, args.k)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        exit_now(2)
    print(f"{len(summaries)} epochs, {next(iter(summaries.values()))['pairs']} pairs -> "
          f"{Path(args.run) / MECHANISM_FILE}")


if __name__ == "__main__":
    main()
    exit_now(0)  # DALI's and torch's teardown is slow, as for the trainer
