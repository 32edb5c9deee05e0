"""One pretraining step, shared by the trainer and bench/train_step.py (which times it with other heads).

Both views of an image are classified as its instance: the encoder embeds the views x images of this rank in
one batch, the criterion (the sharded instance classifier, or any head that maps (features, targets) to an
output whose `loss` is the global-batch mean loss) gives the loss, and every optimizer steps. Nothing here waits for the device: the
caller reads the loss when it needs the number (the trainer once per step, to stop on a non-finite loss
before anything is saved).
"""
import torch

from model.encoder import embed


def train_step(backbone, head, criterion, optimizers, views, ids, precision=None):
    """views: list of [b, 3, S, S] image batches of the same b images; ids [b]; precision: the encoder's
    (model/precision.py; None: the fastest on the images' device). Returns the criterion's output (the
    classifier's: model.classifier.Classified), its loss a tensor."""
    features = embed(backbone, head, torch.cat(views), precision)  # [views x b, feat_dim]
    output = criterion(features, ids.repeat(len(views)))
    for optimizer in optimizers:
        optimizer.zero_grad()
    output.loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    return output
