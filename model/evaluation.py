"""Evaluation of a backbone: distributed weighted kNN (Wu et al., CVPR 2018) and top-k accuracy.

Weighted kNN: for a query with cosine similarities s_j to the bank, the k nearest neighbours vote for
their class with weight exp(s_j / T); the class with the largest sum wins. The bank stays sharded over
the ranks (each rank keeps the features it computed); queries are all-gathered, each rank finds the
top-k of its bank shard, and one allgather of [Q, k] similarities + labels merges the exact global top-k,
so no rank ever holds the whole bank (ImageNet: 1.28M x 2048).
"""
import horovod.torch as hvd
import torch

from kernels.reference import normalize_rows

KNN_SETTINGS = ((20, 0.07), (200, 0.1))  # (k, T): the values of Wu et al. and of the InstDisc/PIC monitors
QUERY_CHUNK = 1024  # queries per similarity block: [chunk, bank shard] stays small


@torch.no_grad()
def extract_features(backbone, loader, device):
    """Normalized pooled features and instance ids of this rank's share of `loader` (eval mode)."""
    was_training = backbone.training
    backbone.eval()
    features, ids = [], []
    for images, batch_ids in loader:
        features.append(normalize_rows(backbone(images.to(device)).float()))
        ids.append(batch_ids.to(device))
    backbone.train(was_training)
    dim = getattr(backbone, "feature_dim", None)
    return (torch.cat(features) if features else torch.empty(0, dim, device=device),
            torch.cat(ids) if ids else torch.empty(0, dtype=torch.long, device=device))


@torch.no_grad()
def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, settings=KNN_SETTINGS):
    """Top-1 (%) of weighted kNN per (k, T); bank/queries are this rank's normalized features [n, C].

    Collective: every rank must call it; all return the same numbers.
    """
    queries, query_labels = hvd.allgather(queries), hvd.allgather(query_labels)
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
        values = hvd.allgather(values[None]).permute(1, 0, 2).reshape(len(chunk), -1)  # [q, P k_max]
        labels = hvd.allgather(labels[None]).permute(1, 0, 2).reshape(len(chunk), -1)
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
