"""The hybrid-parallel one-million-way instance classifier (Liu et al., AAAI 2021, section 3.4).

The backbone is data-parallel; the classifier weight W [N, D] (one row per image) is model-parallel:
rank r of P owns the rows of the contiguous classes [start_r, stop_r) of a balanced split. One step:

  1. every rank normalizes its features and ALLGATHERS them with their ids, so each rank sees the
     global batch E [B, D] (B = sum of the ranks' batches, which may differ);
  2. each rank scores E against its own classes only and reduces the block to per-sample statistics
     (sum of exp with the fixed shift 1/tau, the target logit if it owns it, its local top-K);
  3. ONE packed allgather exchanges those statistics; every rank merges them into the exact global
     logsumexp and top-K (kernels.topk_xent) and so computes the same, bit-identical loss;
  4. backward: each rank forms softmax - q on its own columns from the merged statistics; dW stays
     local (never all-reduced) and the partial dE of every rank goes back to the owners of the
     features with a SUM reduce-scatter (the backward of our allgather). Horovod's own allgather
     backward averages, which would give 1/P of the gradient.

Gradient convention: after loss.backward(), features.grad on each rank is d(global mean loss)/d(its
features) and weight.grad is d(global mean loss)/d(this shard). Backbone gradients therefore have to
be SUMMED over ranks, not averaged: see `distributed_backbone_optimizer`.
"""
import horovod.torch as hvd
import torch

from kernels import reference, seed_rows_, sharded_topk_xent

INIT_BLOCK_ROWS = 65536  # random init is drawn per block of rows of W, so it does not depend on P


def shard_rows(num_instances, num_shards, rank):
    """The rows of W, i.e. the classes [start, stop), of rank `rank` in a balanced split of num_instances
    (sizes differ by <= 1)."""
    base, extra = divmod(num_instances, num_shards)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


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
    return reference.normalize_rows(torch.cat(rows)) if rows else torch.empty(0, dim)


class _AllgatherSumBackward(torch.autograd.Function):
    """Allgather along dim 0 whose backward is a SUM reduce-scatter back to the owners."""

    @staticmethod
    def forward(ctx, local):  # [b, D] -> [B, D]
        ctx.sizes = hvd.allgather(torch.tensor([local.shape[0]])).tolist()
        return hvd.allgather(local)

    @staticmethod
    def backward(ctx, grad_global):  # [B, D] partial dE of this rank -> [b, D] summed over ranks
        received, _ = hvd.alltoall(grad_global.contiguous(), splits=torch.tensor(ctx.sizes, dtype=torch.int32))  # [P * b, D]
        return received.view(hvd.size(), -1, grad_global.shape[1]).sum(dim=0)


def _exchange_stats(packed):  # [B, S] -> [P, B, S], rank order
    return hvd.allgather(packed).view(hvd.size(), *packed.shape)


class ShardedInstanceClassifier(torch.nn.Module):
    """Cosine-softmax classifier over num_instances classes, sharded over the Horovod ranks by classes.

    forward(features [b, dim], ids [b]) -> global-batch mean loss (scalar, identical on every rank).
    smooth_k / smooth_alpha: top-K hardest-class label smoothing (K clamped to N - 1).
    backend: 'auto' (Triton on CUDA, chunked torch on CPU), 'chunked', 'triton' or 'reference'.
    compute_dtype: dtype of the kernels' inputs (normalized features and a copy of the shard); None means
    bf16 on CUDA (tensor cores; statistics and accumulation stay fp32) and the parameters' dtype elsewhere.
    The shard itself and its optimizer state stay in the parameters' dtype.
    """

    def __init__(self, num_instances, dim, *, temperature=0.15, smooth_k=0, smooth_alpha=0.0,
                 backend="auto", compute_dtype=None, seed=0):
        super().__init__()
        if num_instances < 2:
            raise ValueError(f"an instance classifier needs at least 2 instances, got {num_instances}")
        if not 0.0 <= smooth_alpha < 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1), got {smooth_alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not hvd.is_initialized():
            hvd.init()
        self.num_instances, self.dim = num_instances, dim
        self.temperature, self.smooth_k, self.smooth_alpha = temperature, smooth_k, smooth_alpha
        self.backend, self.compute_dtype = backend, compute_dtype
        self.start, self.stop = shard_rows(num_instances, hvd.size(), hvd.rank())
        self.weight = torch.nn.Parameter(random_unit_rows(self.start, self.stop, dim, seed))
        self.last_hardest = None  # merged top-K ids [B, K] of the last forward, for monitoring/tests
        self.last_global_rows = 0  # B of the last forward: the samples of all ranks together

    def extra_repr(self):
        return (f"instances={self.num_instances}, classes=[{self.start}, {self.stop}), dim={self.dim}, "
                f"temperature={self.temperature}, smooth_k={self.smooth_k}, smooth_alpha={self.smooth_alpha}")

    def _gather(self, features, ids, differentiable):
        """Normalized features and ids of the global batch, validated identically on every rank."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [batch, {self.dim}], got {list(features.shape)}")
        if ids.shape != features.shape[:1]:
            raise ValueError(f"ids must be [{features.shape[0]}], got {list(ids.shape)}")
        # At least fp32 on the wire and in the kernels' inputs: D is small, and Horovod has no bf16.
        features_n = reference.normalize_rows(features.to(reference.accumulation_dtype(features.dtype)))
        gathered = _AllgatherSumBackward.apply(features_n) if differentiable else hvd.allgather(features_n)
        ids = hvd.allgather(ids.long())
        # Checked on the gathered batch so that every rank raises together instead of hanging.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_instances):
            raise ValueError(f"instance ids must be in [0, {self.num_instances}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if not torch.isfinite(gathered).all():  # FloatingPointError: the trainer names the step
            raise FloatingPointError("features contain NaN or Inf (on at least one rank)")
        return gathered, ids.to(gathered.device)

    def forward(self, features, ids):
        features_n, ids = self._gather(features, ids, differentiable=True)
        self.last_global_rows = len(ids)
        dtype = self.compute_dtype or (torch.bfloat16 if self.weight.is_cuda else self.weight.dtype)
        loss, self.last_hardest = sharded_topk_xent(
            features_n.to(dtype), self.weight.to(dtype), ids, self.start, self.num_instances,
            temperature=self.temperature, k=self.smooth_k, alpha=self.smooth_alpha, exchange=_exchange_stats,
            backend=self.backend)
        return loss

    @torch.no_grad()
    def seed_(self, features, ids):
        """Raw-feature init: the rows of this shard's classes whose ids are in the global batch := normalized
        features."""
        features_n, ids = self._gather(features, ids, differentiable=False)
        # Seeding has Triton and torch versions only: the chunked loss backend seeds with torch.
        backend = self.backend if self.backend in ("auto", "triton") else "reference"
        return seed_rows_(self.weight.data, features_n, ids, self.start, backend=backend)


def distributed_backbone_optimizer(optimizer, named_parameters):
    """hvd.DistributedOptimizer for the data-parallel part (backbone + head) that SUMS gradients.

    With the classifier's convention each rank's backbone gradient is already its share of
    d(global mean loss)/d(theta), so the sum over ranks is the gradient of a single process on the
    concatenated batch. (Batch-norm statistics stay per rank, as in the paper and MoCo, so networks
    with batch norm match a single process only up to that.) The classifier shard must NOT be in
    this optimizer: give it a plain local optimizer.
    """
    return hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, op=hvd.Sum)
