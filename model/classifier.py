"""The hybrid-parallel one-million-way instance classifier (Liu et al., AAAI 2021, section 3.4).

The backbone is data-parallel; the classifier weight W [N, D] (one row per image) is model-parallel:
rank r of P owns the rows of the contiguous classes [start_r, stop_r) of a balanced split. One step
issues three collectives, each under a stable name (Horovod's response cache then recognises them):

  1. "classifier.features": every rank normalizes its features, packs them with their ids into one
     block (kernels.exchange) and sends it to every rank in ONE alltoall, so each rank sees the global
     batch E [B, D] with its ids (B = sum of the ranks' batches, which may differ: the alltoall also
     returns every rank's batch size, which the backward needs, without a collective of its own);
  2. each rank scores E against its own classes only and reduces the block to per-sample statistics
     (sum of exp with the fixed shift 1/tau, the target logit if it owns it, its local top-K);
     "classifier.stats": ONE packed allgather exchanges them; every rank merges them into the exact
     global logsumexp and top-K (kernels.exchange) and so computes the same, bit-identical loss;
  3. backward: each rank forms softmax - q on its own columns from the merged statistics; dW stays
     local (never all-reduced) and "classifier.grad_features", an alltoall, sends the partial dE of
     every sample back to the rank that owns it, where the partials are SUMMED (the backward of our
     gather); Horovod's own allgather backward averages, which would give 1/P of the gradient.

No host synchronisation in the forward or backward (nothing waits for the GPU but the collectives):
bad input is not checked there but made detectable. An id outside [0, N) makes that sample's loss,
and so the loss, NaN on every rank, and NaN/Inf features do so by themselves; the trainer checks the
loss once per step anyway and then calls `check_input()`, which raises the one-line error (ValueError
for ids, FloatingPointError for features) on every rank together, since it reads the global batch.

Gradient convention: after loss.backward(), features.grad on each rank is d(global mean loss)/d(its
features) and weight.grad is d(global mean loss)/d(this shard). Backbone gradients therefore have to
be SUMMED over ranks, not averaged: see `distributed_backbone_optimizer`.

The collectives are the process group's (run/distributed.py), handed to the classifier as `group` (default:
the engine the entry point started) and to the kernels as one object (`RankCollectives`); with one rank they are
copies, and the classifier is the full softmax.
"""
from typing import NamedTuple

import torch

from kernels import NormalizedExchange, seed_rows_, shard_ops, sharded_topk_xent_and_stats
from kernels.reference import check_options, normalize_rows
from model.precision import has_bf16_tensor_cores
from model.step import SGD
from run.distributed import engine, shard_rows

INIT_BLOCK_ROWS = 65536  # random init is drawn per block of rows of W, so it does not depend on P
NAMES = {"k": "smooth_k", "alpha": "smooth_alpha"}  # the loss's options (kernels.reference) as the classifier names them


def random_unit_rows(start, stop, dim, seed):
    """Rows [start, stop) of a random W [N, dim] with unit-norm rows, identical whatever the sharding.

    Unit norm matches the scale of the raw-feature init, so that ablation changes directions only.
    """
    rows = []
    first_block, end_block = start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)
    for block in range(first_block, end_block):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        block_rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=generator)
        lo = max(start, block * INIT_BLOCK_ROWS) - block * INIT_BLOCK_ROWS
        hi = min(stop, (block + 1) * INIT_BLOCK_ROWS) - block * INIT_BLOCK_ROWS
        rows.append(block_rows[lo:hi])
    return normalize_rows(torch.cat(rows)) if rows else torch.empty(0, dim)


class RankCollectives:
    """The collectives of the kernels (kernels.topk_xent) across the ranks of `group`, for one step.

    features: this rank's packed block [P, b, W] (one copy per rank) -> the global block [B, W] in rank order,
    in ONE alltoall whose received splits are every rank's b; grad_features: the partial dE_n [B, D] of this
    rank -> [P, b, D], the partials of this rank's samples from every rank, by the alltoall back; stats: the
    statistics [B, S] of this shard -> [P, B, S] of every shard, rank order, in ONE allgather.
    """

    def __init__(self, group, name):
        self.group, self.name, self.copies, self.sizes, self.batch = group, name, group.size, None, None

    def features(self, packed):
        copies, batch, width = packed.shape
        self.batch = batch  # the backward receives this many rows from every rank
        received, self.sizes = self.group.alltoall(packed.view(copies * batch, width), splits=[batch] * copies,
                                                   name=f"classifier.{self.name}")
        return received

    def grad_features(self, grad_features_n):
        received, _ = self.group.alltoall(grad_features_n, splits=self.sizes, name=f"classifier.grad_{self.name}",
                                          received=[self.batch] * self.copies)
        return received.view(self.copies, -1, grad_features_n.shape[1])

    def stats(self, packed):
        # Every rank scores the same global batch: the blocks have one shape.
        return self.group.allgather(packed, name="classifier.stats", same_shape=True).view(self.copies, *packed.shape)


class Classified(NamedTuple):
    """What one forward of the classifier gives: the loss and, per sample of the GLOBAL batch (rank order, on the
    device, no host sync), what the trainer monitors (run/diagnostics.py) and `check_input` judges."""
    loss: torch.Tensor  # the global-batch mean loss, scalar, bit-identical on every rank
    ids: torch.Tensor  # [B] instance ids
    own_probability: torch.Tensor  # [B] exp(z_{i,y_i} - lse_i)
    own_is_top1: torch.Tensor  # [B] bool: the own class is the top-1, ties to the lower id as in an argmax
    hardest: torch.Tensor  # [B, K] merged top-K ids
    features_n: torch.Tensor  # [B, D] normalized features, detached


class ShardedInstanceClassifier(torch.nn.Module):
    """Cosine-softmax classifier over num_instances classes, sharded over the ranks of `group` by classes.

    forward(features [b, dim], ids [b]) -> Classified: the global-batch mean loss (scalar, identical on every
    rank) and the per-sample numbers of the global batch.
    smooth_k / smooth_alpha: top-K hardest-class label smoothing (K clamped to N - 1).
    backend: 'auto' (Triton on CUDA, chunked torch on CPU), 'chunked', 'triton' or 'reference'.
    compute_dtype: the dtype the kernels round the products' operands to (normalized features and the
    shard; the trainer's --precision); None means bf16 on a GPU with bf16 tensor cores (model/precision.py;
    statistics and accumulation stay fp32) and the inputs' own dtypes elsewhere. The shard itself, its gradient and its optimizer state stay in the
    parameters' dtype. group: the run.distributed Engine whose collectives it uses (default: the started one).
    """

    def __init__(self, num_instances, dim, *, temperature=0.15, smooth_k=0, smooth_alpha=0.0,
                 backend="auto", compute_dtype=None, seed=0, group=None):
        super().__init__()
        if num_instances < 2:
            raise ValueError(f"an instance classifier needs at least 2 instances, got {num_instances}")
        check_options(NAMES, temperature=temperature, k=smooth_k, alpha=smooth_alpha)
        self.group = group or engine()
        self.num_instances, self.dim = num_instances, dim
        self.temperature, self.smooth_k, self.smooth_alpha = temperature, smooth_k, smooth_alpha
        self.backend, self.compute_dtype = backend, compute_dtype
        self.start, self.stop = shard_rows(num_instances, self.group.size, self.group.rank)
        self.weight = torch.nn.Parameter(random_unit_rows(self.start, self.stop, dim, seed))

    def extra_repr(self):
        return (f"instances={self.num_instances}, classes=[{self.start}, {self.stop}), dim={self.dim}, "
                f"temperature={self.temperature}, smooth_k={self.smooth_k}, smooth_alpha={self.smooth_alpha}")

    def _gather(self, features, ids, collectives):
        """Normalized features [B, D] and ids [B] of the global batch (differentiable w.r.t. features)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [batch, {self.dim}], got {list(features.shape)}")
        if ids.shape != features.shape[:1]:
            raise ValueError(f"ids must be [{features.shape[0]}], got {list(ids.shape)}")
        ops = shard_ops(self.backend, self.weight.device)
        return NormalizedExchange.apply(features, ids.to(features.device, non_blocking=True), ops, collectives)

    def forward(self, features, ids):
        collectives = RankCollectives(self.group, "features")
        features_n, ids = self._gather(features, ids, collectives)
        compute_dtype = self.compute_dtype or (torch.bfloat16 if has_bf16_tensor_cores(self.weight.device) else None)
        loss, merged = sharded_topk_xent_and_stats(
            features_n, self.weight, ids, self.start, self.num_instances, temperature=self.temperature,
            k=self.smooth_k, alpha=self.smooth_alpha, compute_dtype=compute_dtype, collectives=collectives,
            backend=self.backend)
        return Classified(loss, ids, merged.own_probability, merged.own_is_top1, merged.hardest, features_n.detach())

    def check_input(self, classified):
        """Raise the one-line error for bad input to the forward that gave `classified`, if it had any: ValueError
        for ids outside [0, num_instances), FloatingPointError for NaN/Inf features (on any rank). Every rank
        raises the same, as it reads the global batch. Reads the device (one host sync): call it where the loss
        was found non-finite, which bad input guarantees."""
        self._validate(classified.features_n, classified.ids)

    def _validate(self, features_n, ids):
        if ids.numel() and bool(((ids < 0) | (ids >= self.num_instances)).any()):
            raise ValueError(f"instance ids must be in [0, {self.num_instances}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if not bool(torch.isfinite(features_n).all()):  # FloatingPointError: the trainer names the step
            raise FloatingPointError("features contain NaN or Inf (on at least one rank)")

    @torch.no_grad()
    def seed_(self, features, ids):
        """Raw-feature init: the rows of this shard's classes whose ids are in the global batch := normalized
        features. Bad input raises here (seeding is not the training step: the host check is cheap)."""
        features_n, ids = self._gather(features, ids, RankCollectives(self.group, "seed_features"))
        self._validate(features_n, ids)
        # Seeding has Triton and torch versions only: the chunked loss backend seeds with torch.
        backend = self.backend if self.backend in ("auto", "triton") else "reference"
        return seed_rows_(self.weight.data, features_n, ids, self.start, backend=backend)


class ShardSGD(SGD):
    """model.step.SGD (torch.optim.SGD's updates) for the classifier shard (local: never all-reduced) that adds
    the weight decay to the gradient in place. torch's SGD adds it into a new tensor (grad.add(param,
    alpha=weight_decay)): one more [C, D] beside the weight, its gradient and its momentum at the peak of every
    step, a third more than they hold, on the largest state of a run. The same add into the gradient itself:
    every update is bitwise the one torch.optim.SGD makes. No closure and no maximize (the trainer uses
    neither)."""

    def __init__(self, params, **options):
        if options.get("maximize"):
            raise ValueError("ShardSGD minimizes only")
        super().__init__(params, **options)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardSGD takes no closure: it would recompute the gradients after the decay")
        decays = [group["weight_decay"] for group in self.param_groups]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and group["weight_decay"]:
                    param.grad.add_(param, alpha=group["weight_decay"])
            group["weight_decay"] = 0
        try:
            return super().step()
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay


def distributed_backbone_optimizer(optimizer, named_parameters, group=None):
    """The data-parallel optimizer of the backbone + head (group: default the started engine) that SUMS
    gradients over the ranks.

    With the classifier's convention each rank's backbone gradient is already its share of
    d(global mean loss)/d(theta), so the sum over ranks is the gradient of a single process on the
    concatenated batch. (Batch-norm statistics stay per rank, as in the paper and MoCo, so networks
    with batch norm match a single process only up to that.) The classifier shard must NOT be in
    this optimizer: give it a plain local optimizer.
    """
    return (group or engine()).data_parallel_optimizer(optimizer, named_parameters, op="sum")
