"""The encoder of a run: backbone (pooled features) and projection head, built from the run's config.

Images enter the backbone in channels_last memory format (model/resnet.py), and the convolutions (cuDNN, oneDNN)
then run in that layout, under autocast to the run's precision (model/precision.py: bf16 on GPUs with bf16
tensor cores, fp32 on the CPU and older GPUs; bench/RESULTS.md, "CPU speed of the demo"). The parameters stay
contiguous: Horovod's collectives (broadcast_parameters, the gradient allreduce) refuse non-contiguous tensors,
and gradients take the layout of their parameter.
"""
from model.head import ProjectionHead
from model.precision import autocast
from model.resnet import build_backbone


def build_encoder(config, device):
    """(backbone, head) as config.arch / small_stem / width / hidden_dim / feat_dim say, on `device`."""
    backbone = build_backbone(config.arch, small_stem=config.small_stem, width=config.width)
    head = ProjectionHead(backbone.feature_dim, config.hidden_dim, config.feat_dim)
    return backbone.to(device), head.to(device)


def embed(backbone, head, images, precision=None):
    """Head output [b, feat_dim], under autocast to `precision` ('bf16' or 'fp32'; None: the fastest on the
    images' device). A 1-image batch (a rank's last partial batch) passes the head's BatchNorm1d in eval mode,
    since batch statistics of one sample do not exist."""
    with autocast(precision, images.device):
        pooled = backbone(images)
        if len(pooled) == 1 and head.training:
            head.eval()
            features = head(pooled)
            head.train()
            return features
        return head(pooled)
