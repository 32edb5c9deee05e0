"""One pretraining step, shared by the trainer and bench/train_step.py (which times it with other heads).

Both views of an image are classified as its instance: the encoder embeds the views x images of this rank in
one batch, the criterion (the sharded instance classifier, or any head that maps (features, targets) to an
output whose `loss` is the global-batch mean loss) gives the loss, and every optimizer steps. Nothing here waits for the device: the
caller reads the loss when it needs the number (the trainer once per step, to stop on a non-finite loss
before anything is saved).
"""
import inspect

import torch

from model.encoder import embed


class SGD(torch.optim.SGD):
    """torch.optim.SGD, the same updates and the same state, without importing torch's compiler. torch marks an
    optimizer's methods for torch.compile (`step` breaks the graph, `zero_grad`, `state_dict`, `load_state_dict`
    and `add_param_group` are "not compiled"), and each mark imports torch._dynamo on its first call: about 1.5 s
    of CPU in every process that trains, more than `import torch`. Nothing of the trainer is compiled, so these
    are the marked methods' own functions, `step` under no_grad as its mark sets it for a non-differentiable
    optimizer (the only kind this class makes)."""
    step = torch.no_grad()(inspect.unwrap(torch.optim.SGD.step))
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)

    def __init__(self, params, **options):
        if options.get("differentiable"):
            raise ValueError("model.step.SGD is not differentiable: its step runs under no_grad")
        super().__init__(params, **options)


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
