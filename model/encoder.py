"""The encoder of a run: backbone (pooled features) and projection head, built from the run's config.

On CUDA the encoder runs in channels_last memory format under bf16 autocast (tensor cores); on the CPU in
fp32 with the default layout.
"""
import torch

from model.head import ProjectionHead
from model.resnet import build_backbone


def build_encoder(config, device):
    """(backbone, head) as config.arch / small_stem / width / hidden_dim / feat_dim say, on `device`."""
    backbone = build_backbone(config.arch, small_stem=config.small_stem, width=config.width)
    head = ProjectionHead(backbone.feature_dim, config.hidden_dim, config.feat_dim)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return backbone.to(device, memory_format=memory_format), head.to(device)


def embed(backbone, head, images):
    """Head output [b, feat_dim] (bf16 autocast on CUDA). A 1-image batch (a rank's last partial batch)
    passes the head's BatchNorm1d in eval mode, since batch statistics of one sample do not exist."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        pooled = backbone(images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images)
        if len(pooled) == 1 and head.training:
            head.eval()
            features = head(pooled)
            head.train()
            return features
        return head(pooled)
