"""Per-rank memory and per-step communication of the hybrid-parallel classifier vs a replicated one.

Nothing is allocated: the classifier is sized by formula and the backbone by tracing it on the
`meta` device. Sizes are in bytes, fp32 (4 bytes) for weights and activations; P ranks, per-rank
batch b, global batch B = P b, N instances, feature dim D, top-K K, C = ceil(N / P) rows per shard.

Communication is counted as the bytes one rank RECEIVES per step (what the wire must carry into it):
  hybrid:     features with their ids, one alltoall (B-b) W 4 (W = D rounded up to even + 2 columns
              holding the int64 id, kernels.exchange) + packed fp32 stats (P-1) B (2+2K') 4 with
              K' = max(K, 1) + the dE reduce-scatter (alltoall) (P-1) b D 4
  replicated: ring allreduce of dW, 2 (P-1)/P N D 4 (every rank holds all of W, PIC-style)
The backbone's gradient allreduce, 2 (P-1)/P |theta| 4, is the same in both layouts.

A checkpoint (run/checkpoint.py) holds every row with its SGD momentum, 2 N D 4, in one shard file of 2 C D 4 per
rank (hybrid; replicated, one file of 2 N D 4), and state.pt: the backbone + head weights and momentum,
2 |theta| 4 (its BatchNorm buffers and a few KB of metadata aside).
tests/test_plan.py checks these formulas against the bytes that pass through Horovod in real runs.
"""
import math

import torch

from kernels.exchange import packed_width
from model.head import ProjectionHead
from model.resnet import build_backbone

FLOAT, STATS = 4, 4  # bytes: fp32 weights/activations (and packed features), fp32 packed statistics


def hybrid_received_bytes(num_ranks, batch_per_rank, dim, k):
    P, b, D = num_ranks, batch_per_rank, dim
    B = P * b
    return (B - b) * packed_width(D, torch.float32) * FLOAT + (P - 1) * B * (2 + 2 * max(k, 1)) * STATS \
        + (P - 1) * b * D * FLOAT


def ring_allreduce_received_bytes(num_ranks, payload_bytes):
    return 2 * (num_ranks - 1) * payload_bytes / num_ranks


def backbone_bytes(arch, small_stem, width, feat_dim, hidden_dim, image_size, batch_per_rank):
    """Parameter count and fp32 activation bytes saved for backward, traced on the meta device."""
    saved = []

    def count(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.device("meta"):
        backbone = build_backbone(arch, small_stem=small_stem, width=width)
        head = ProjectionHead(backbone.feature_dim, hidden_dim, feat_dim)
        images = torch.empty(batch_per_rank, 3, image_size, image_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            head(backbone(images))
    params = sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])
    return params, sum(saved)


def plan(*, instances, gpus, batch_size, feat_dim, k, arch="resnet50", small_stem=False, width=64,
         hidden_dim=2048, image_size=224):
    """Rows of (item, hybrid bytes, replicated bytes) for one rank; see the module docstring."""
    P, b, D, N = gpus, batch_size, feat_dim, instances
    B, C = P * b, math.ceil(instances / gpus)
    params, activations = backbone_bytes(arch, small_stem, width, feat_dim, hidden_dim, image_size, b)
    backbone_state = 3 * params * FLOAT  # weights, gradient, momentum
    rows = [
        ("classifier weight", C * D * FLOAT, N * D * FLOAT),
        ("classifier grad + momentum", 2 * C * D * FLOAT, 2 * N * D * FLOAT),
        # Fused kernels in both layouts: features (+ their grad) and per-row statistics, never logits.
        ("classifier step activations", 2 * B * D * FLOAT + P * B * (2 + 2 * max(k, 1)) * STATS,
         2 * b * D * FLOAT + b * (2 + 2 * k) * STATS),
        ("backbone+head weights, grad, momentum", backbone_state, backbone_state),
        ("backbone+head activations (fp32)", activations, activations),
    ]
    rows.append(("total memory", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    backbone_comm = ring_allreduce_received_bytes(P, params * FLOAT)
    rows += [
        ("communication/step: classifier", hybrid_received_bytes(P, b, D, k),
         ring_allreduce_received_bytes(P, N * D * FLOAT)),
        ("communication/step: backbone allreduce", backbone_comm, backbone_comm),
        ("materialised logits (not allocated by the kernels)", B * C * FLOAT, b * N * FLOAT),
    ]
    state_file = 2 * params * FLOAT
    rows += [
        ("checkpoint: classifier file of one rank", 2 * C * D * FLOAT, 2 * N * D * FLOAT),
        ("checkpoint in all (every rank's file + state.pt)", 2 * N * D * FLOAT + state_file,
         2 * N * D * FLOAT + state_file),
    ]
    return rows
