"""Learning-rate schedules: pretraining's linear warm-up + cosine decay (Goyal et al. 2017; Loshchilov and
Hutter 2017), evaluated per step, and the setter that both pretraining and linear evaluation use."""
import math


def warmup_cosine(progress, base_lr, warmup_epochs, epochs):
    """lr at `progress` epochs into the run: linear from 0 to base_lr over warmup_epochs, then cosine to 0
    at `epochs`."""
    if progress < warmup_epochs:
        return base_lr * progress / warmup_epochs
    return 0.5 * base_lr * (1 + math.cos(math.pi * (progress - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)))


def set_learning_rate(optimizer, lr):
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
