"""Projection head between the backbone and the instance classifier: g(h) = W2 ReLU(BN(W1 h)) + b2.

The 2-layer MLP head of SimCLR (Chen et al., ICML 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"), with BatchNorm after the hidden layer as in its reference implementation. Liu et al. (AAAI 2021)
train their one-million-way instance classifier on such a head's output (hidden 2048 and output 128 for
ResNet-50); the representation kept after training is the backbone's, before the head.
"""
from torch import nn


class ProjectionHead(nn.Module):
    """[B, in_dim] -> [B, out_dim] through a hidden layer of hidden_dim."""

    def __init__(self, in_dim, hidden_dim, out_dim=128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),  # a bias would be cancelled by the BN's mean subtraction
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features):  # [B, in_dim]
        return self.mlp(features)  # [B, out_dim]
