"""Evaluation of a backbone: distributed weighted kNN (Wu et al., CVPR 2018) and top-k accuracy.

Weighted kNN: for a query with cosine similarities s_j to the bank, the k nearest neighbours vote for
their class with weight exp(s_j / T); the class with the largest sum wins. The bank stays sharded over
the ranks (each rank keeps the features it computed); queries are all-gathered, each rank finds the
top-k of its bank shard, and one allgather of [Q, k] similarities + labels merges the exact global top-k,
so no rank ever holds the whole bank (ImageNet: 1.28M x 2048).

Linear evaluation follows MoCo's protocol (He et al., CVPR 2020, main_lincls.py): the backbone frozen in
eval mode, SGD on a linear layer over its pooled features, step decays of the lr, and a sanity check that
the backbone did not change. The baselines are the raw pixels and the same architecture at random
initialisation, as is and with its BatchNorm statistics estimated on shuffled batches of the train split.
"""
import copy

import torch

from data.loaders import eval_loader, linear_train_loader
from kernels.reference import normalize_rows
from model.encoder import build_encoder
from model.initialisation import calibrate_batchnorm
from model.step import SGD
from run.distributed import engine
from run.errors import UsageError
from run.schedule import set_learning_rate

KNN_SETTINGS = ((20, 0.07), (200, 0.1))  # (k, T): the values of Wu et al. and of the InstDisc/PIC monitors
QUERY_CHUNK = 1024  # queries per similarity block: [chunk, bank shard] stays small


@torch.no_grad()
def extract_features(backbone, loader, device):
    """Normalized pooled features and instance ids of this rank's share of `loader` (eval mode); the loader
    delivers on `device`, which holds the empty result of an empty share."""
    was_training = backbone.training
    backbone.eval()
    features, ids = [], []
    for images, batch_ids in loader:
        features.append(normalize_rows(backbone(images).float()))
        ids.append(batch_ids)
    backbone.train(was_training)
    dim = getattr(backbone, "feature_dim", None)
    return (torch.cat(features) if features else torch.empty(0, dim, device=device),
            torch.cat(ids) if ids else torch.empty(0, dtype=torch.long, device=device))


@torch.no_grad()
def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, settings=KNN_SETTINGS):
    """Top-1 (%) of weighted kNN per (k, T); bank/queries are this rank's normalized features [n, C].

    Collective: every rank must call it; all return the same numbers.
    """
    group = engine()
    queries, query_labels = group.allgather(queries, name="knn.queries"), group.allgather(query_labels,
                                                                                           name="knn.query_labels")
    k_max = max(k for k, _ in settings)
    correct = {k: 0 for k, _ in settings}
    for begin in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[begin:begin + QUERY_CHUNK]  # [q, C]
        similarity = chunk @ bank.T  # [q, n_local]
        take = min(k_max, bank.shape[0])
        values = similarity.new_full((len(chunk), k_max), float("-inf"))
        labels = bank_labels.new_zeros((len(chunk), k_max))
        values[:, :take], nearest = similarity.topk(take, dim=1)
        labels[:, :take] = bank_labels[nearest]
        # [q, P k_max]: every rank's top-k of its bank shard
        values = group.allgather(values[None], name="knn.values").permute(1, 0, 2).reshape(len(chunk), -1)
        labels = group.allgather(labels[None], name="knn.labels").permute(1, 0, 2).reshape(len(chunk), -1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k_max]
        values, labels = values.gather(1, order), labels.gather(1, order)
        truth = query_labels[begin:begin + QUERY_CHUNK]
        for k, temperature in settings:
            votes = values.new_zeros(len(chunk), num_classes)
            votes.scatter_add_(1, labels[:, :k], (values[:, :k] / temperature).exp())
            correct[k] += int((votes.argmax(dim=1) == truth).sum())
    return {f"knn{k}_top1": 100.0 * correct[k] / max(len(queries), 1) for k, _ in settings}


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of rows whose label is among the top-k logits, per k (k clamped to the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def knn_monitor(backbone, train_index, val_index, config, device):
    """Weighted kNN top-1 (%) of the pooled backbone features, train split as the bank and val as the queries;
    {} when the data has no labelled val split. Collective."""
    if val_index is None or (train_index.labels < 0).any():
        return {}
    if val_index.class_names != train_index.class_names:
        raise UsageError(f"the class folders of {val_index.root} differ from those of {train_index.root}")
    bank, queries = [extract_features(backbone, eval_loader(index, config), device)
                     for index in (train_index, val_index)]
    labels = [torch.as_tensor(index.labels, device=device)[ids] for index, (_, ids) in
              ((train_index, bank), (val_index, queries))]
    return knn_accuracy(bank[0], labels[0], queries[0], labels[1], len(train_index.class_names))


class RawPixels(torch.nn.Module):
    """The baseline without a network: the evaluation view's pixels flattened, [b, 3, S, S] -> [b, 3 S S], back
    in [0, 1]. The loaders standardize with the ImageNet mean and std; undoing it matters to a cosine kNN, where a
    constant offset on every pixel dilutes the strokes (digits, kNN20: 94.7% in [0, 1], 92.0% standardized)."""

    def __init__(self, image_size, mean, std):
        """mean, std: the loaders' per-channel standardization, in units of 0..255 pixels."""
        super().__init__()
        self.feature_dim = 3 * image_size ** 2
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) / 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) / 255)

    def forward(self, images):  # [b, 3, S, S] standardized
        return (images * self.std + self.mean).flatten(1)  # [b, 3 S S] in [0, 1]


@torch.no_grad()
def baselines(config, device, train_index):
    """What a pretrained backbone is compared with: the raw pixels, and the same architecture at random
    initialisation (the run's seed), as is (BatchNorm statistics at their init, mean 0 and variance 1, so its
    features are badly scaled) and with its BatchNorm statistics estimated on shuffled batches of the train split,
    as the raw-feature init does for the network that pretraining starts from (model/initialisation.py)."""
    from data.augment import IMAGENET_MEAN, IMAGENET_STD  # lazy, as data.loaders: DALI
    torch.manual_seed(config.seed)
    as_is = build_encoder(config, device)[0].eval()
    calibrated = copy.deepcopy(as_is)
    calibrate_batchnorm(calibrated, (calibrated,), eval_loader(train_index, config, shuffle=True))
    return {"raw pixels": RawPixels(config.image_size, IMAGENET_MEAN, IMAGENET_STD).to(device),
            "random init": as_is, "random init + BN stats": calibrated}


def linear_evaluation(backbone, train_index, val_index, config, settings, device, log):
    """Train a linear layer on the frozen backbone's pooled features (all ranks, averaged gradients) and
    return its val top-1 / top-5 (%). settings: epochs, lr, momentum, weight_decay, milestones (fractions
    of the epochs where the lr drops 10x), batch_size per rank."""
    num_classes = len(train_index.class_names)
    train_labels = torch.as_tensor(train_index.labels, device=device)
    val_labels = torch.as_tensor(val_index.labels, device=device)
    classifier = torch.nn.Linear(backbone.feature_dim, num_classes).to(device)
    torch.nn.init.normal_(classifier.weight, std=0.01)  # MoCo's init of the linear layer
    torch.nn.init.zeros_(classifier.bias)
    group = engine()
    group.broadcast_parameters(classifier.state_dict().items(), root=0)
    optimizer = group.data_parallel_optimizer(  # averages: each rank's loss is its own batch mean
        SGD(classifier.parameters(), lr=settings.lr, momentum=settings.momentum,
            weight_decay=settings.weight_decay), classifier.named_parameters(), op="average")
    frozen = {key: value.clone() for key, value in backbone.state_dict().items()}
    backbone.eval()  # frozen: BatchNorm uses the pretrained running statistics
    for epoch in range(settings.epochs):
        lr = settings.lr * 0.1 ** sum(epoch >= fraction * settings.epochs for fraction in settings.milestones)
        set_learning_rate(optimizer, lr)
        for images, ids in linear_train_loader(train_index, config, epoch, settings.batch_size):
            with torch.no_grad():
                features = backbone(images).float()
            loss = torch.nn.functional.cross_entropy(classifier(features), train_labels[ids])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log.print(f"  linear epoch {epoch + 1}/{settings.epochs}: lr {lr:.3g}, last batch loss {loss.item():.4f}")
    correct = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    with torch.no_grad():
        for images, ids in eval_loader(val_index, config, batch_size=settings.batch_size):
            hits = topk_correct(classifier(backbone(images).float()), val_labels[ids])
            correct += torch.tensor([hits[1], hits[5], len(ids)], dtype=torch.float64)
    sanity_check(backbone, frozen)
    top1, top5, seen = group.allreduce(correct, op="sum", name="linear-eval.correct").tolist()
    return {"linear_top1": 100 * top1 / seen, "linear_top5": 100 * top5 / seen}


def sanity_check(backbone, frozen):
    """The linear evaluation must not have changed the backbone (weights or BatchNorm statistics)."""
    for key, value in backbone.state_dict().items():
        if not torch.equal(value, frozen[key]):
            raise RuntimeError(f"backbone tensor {key} changed during linear evaluation")


def report(log, title, results):
    """results {backbone name: {metric: %}} as one table, and one metrics.jsonl record."""
    names = sorted({name for metrics in results.values() for name in metrics})
    log.table(title, ["backbone", *names],
              [[backbone, *[f"{metrics[name]:.2f}%" if name in metrics else "-" for name in names]]
               for backbone, metrics in results.items()])
    log.record(evaluation=title, **{f"{b}/{m}": v for b, metrics in results.items() for m, v in metrics.items()})
