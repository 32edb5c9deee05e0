"""Synthetic input (`trainer.py --data synthetic`): random images made on the training device, no files, no
DALI, no index, as NVIDIA DeepLearningExamples' `--data-backend synthetic` and Horovod's synthetic benchmark.

It measures the training step without I/O and runs the whole trainer on a machine without DALI. The
instances are the ids 0 .. N-1 of `--instances N`. Every epoch deals them out like the DALI reader: one
permutation shared by all ranks (seeded by the epoch's seed), cut into contiguous per-rank shards of
ceil(N / P) ids (the last shard filled up from the start of the permutation, so a few ids come twice when P
does not divide N), batches of batch_size with a smaller last one; `steps_per_epoch` cuts an epoch short (a pass over 1.28M ids is 20,000 steps at 64 images per
rank on 1 GPU). The pixels are drawn once per loader, N(0, 1) like normalized images, and every batch
reuses them: their values do not matter to the speed, and drawing them anew would add work a real input
pipeline does elsewhere.
"""
import math

import torch


class SyntheticLoader:
    """Batches of (views: `views` x [b, 3, S, S] float32, ids [b] int64) on `device`, or of (images, ids)
    when views is None (the evaluation pass). One `for` is one epoch; `len()` is its number of batches."""

    def __init__(self, num_instances, *, batch_size, image_size, views, rank, world_size, seed, device,
                 steps_per_epoch=None):
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_instances, generator=generator)
        shard = math.ceil(num_instances / world_size)
        self.ids = order.repeat(2)[rank * shard:(rank + 1) * shard]  # the last shard wraps around
        self.batch_size, self.views, self.device = batch_size, views, device
        self.steps = math.ceil(shard / batch_size)
        if steps_per_epoch is not None:
            self.steps = min(self.steps, steps_per_epoch)
        pixels = torch.randn(max(views or 1, 1), batch_size, 3, image_size, image_size, generator=generator)
        self.pixels = pixels.to(device)

    def __len__(self):
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            ids = self.ids[step * self.batch_size:(step + 1) * self.batch_size].to(self.device)
            images = [view[:len(ids)] for view in self.pixels]
            yield (images if self.views else images[0]), ids
