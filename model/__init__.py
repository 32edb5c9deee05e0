"""Model pieces: ResNet backbones, projection head, torchvision export (re-exports only)."""
from model.export import expected_torchvision_keys, export_backbone
from model.head import ProjectionHead
from model.resnet import BACKBONES, ResNet, build_backbone, resnet18, resnet50
