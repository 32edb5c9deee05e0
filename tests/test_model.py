"""Backbones, projection head and torchvision export.

The torchvision references are tests/data/torchvision_resnet_{keys,features}.json, dumped from the torchvision
0.29.1 wheel (tests/data/README.md says how); torchvision itself does not import with our torch, and a reference
derived from our own model could not fail.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model import ProjectionHead, build_backbone, expected_torchvision_keys, export_backbone
from tests.conftest import ROOT

DATA = Path(__file__).parent / "data"
TORCHVISION_SHAPES = json.loads((DATA / "torchvision_resnet_keys.json").read_text())
TORCHVISION_FEATURES = json.loads((DATA / "torchvision_resnet_features.json").read_text())
# The generator of the features fixture, for the weights and images it used; importing it does not run it.
_spec = importlib.util.spec_from_file_location("reference", DATA / "dump_torchvision_resnet_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
# Parameter counts (with the 1000-way fc) published in torchvision's model documentation.
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
FEATURE_DIM_AT_WIDTH_64 = {"resnet18": 512, "resnet50": 2048}


def with_torchvision_fc(backbone, num_classes=1000):
    """Our backbone plus an `fc` submodule, i.e. torchvision's module tree (forward still returns features)."""
    backbone.fc = nn.Linear(backbone.feature_dim, num_classes)
    return backbone


def shapes_of(state_dict):
    return {key: list(tensor.shape) for key, tensor in state_dict.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("width", [16, 64])
@pytest.mark.parametrize("small_stem, image_size", [(True, 32), (False, 64)])
def test_forward_gives_pooled_features(name, width, small_stem, image_size):
    torch.manual_seed(0)
    backbone = build_backbone(name, small_stem=small_stem, width=width)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, image_size, image_size))
    assert backbone.feature_dim == FEATURE_DIM_AT_WIDTH_64[name] * width // 64
    assert features.shape == (2, backbone.feature_dim)
    assert torch.isfinite(features).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_channels_last_input_matches_contiguous(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, small_stem=True, width=16)
    images = torch.randn(3, 3, 32, 32)
    expected = backbone(images)
    channels_last = images.to(memory_format=torch.channels_last).requires_grad_()
    features = backbone.to(memory_format=torch.channels_last)(channels_last)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    features.square().sum().backward()
    assert channels_last.grad.shape == images.shape


def test_encoder_runs_channels_last_with_contiguous_parameters_and_gradients():
    """The encoder's convolutions see channels_last activations, but Horovod's broadcast and allreduce take only
    contiguous tensors: its parameters and their gradients must stay contiguous (model/encoder.py)."""
    import argparse

    from model.encoder import build_encoder, embed
    torch.manual_seed(0)
    config = argparse.Namespace(arch="resnet18", small_stem=True, width=16, hidden_dim=32, feat_dim=8)
    backbone, head = build_encoder(config, torch.device("cpu"))
    images = torch.randn(4, 3, 32, 32)
    features = embed(backbone, head, images)
    assert backbone.conv1(images.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)  # the layout the convolutions run in
    features.square().sum().backward()
    parameters = [*backbone.parameters(), *head.parameters()]
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in parameters)
    torch.testing.assert_close(features, head(backbone(images)), rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_through_backbone_and_head():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True, width=16)
    head = ProjectionHead(backbone.feature_dim, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = head(backbone(torch.randn(4, 3, 32, 32)))
    assert embeddings.shape == (4, 32)
    assert torch.isfinite(embeddings.float()).all()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_keys_and_shapes_are_torchvision_minus_fc(name):
    backbone_shapes = shapes_of(build_backbone(name).state_dict())
    torchvision = TORCHVISION_SHAPES[name]
    torchvision_without_fc = {key: shape for key, shape in torchvision.items() if not key.startswith("fc.")}
    assert backbone_shapes == torchvision_without_fc


@pytest.mark.parametrize("name, depth", [("resnet18", 18), ("resnet50", 50)])
def test_export_matches_torchvision_keys_order_and_shapes(name, depth):
    exported = export_backbone(build_backbone(name).state_dict())
    assert list(exported) == list(TORCHVISION_SHAPES[name])
    assert shapes_of(exported) == TORCHVISION_SHAPES[name]
    assert expected_torchvision_keys(depth) == list(TORCHVISION_SHAPES[name])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_forward_matches_torchvision_on_reference_weights(name):
    """Keys and shapes cannot see stride placement, padding or ReLU order; the features torchvision computed can."""
    backbone = build_backbone(name)
    reference.fill_reference_weights(backbone)
    with torch.no_grad():
        features = backbone.eval()(reference.reference_images())  # [B, C]
    expected = TORCHVISION_FEATURES[name]
    first = features[:, : reference.FEATURES_KEPT]
    torch.testing.assert_close(first, torch.tensor(expected["first"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.norm(dim=1), torch.tensor(expected["norm"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_count_with_fc_matches_torchvision(name):
    model = with_torchvision_fc(build_backbone(name))
    assert sum(parameter.numel() for parameter in model.parameters()) == TORCHVISION_PARAMETERS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_export_round_trips_with_strict_loading(name):
    torch.manual_seed(0)
    trained = build_backbone(name, zero_init_residual=True)
    with torch.no_grad():  # make every tensor distinguishable from a fresh init, buffers included
        for tensor in trained.state_dict().values():
            tensor.copy_(torch.randint(0, 1000, tensor.shape))
    exported = export_backbone(trained.state_dict(), num_classes=10)

    reloaded = with_torchvision_fc(build_backbone(name), num_classes=10)
    reloaded.load_state_dict(exported, strict=True)
    for key, tensor in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert not reloaded.fc.weight.any() and not reloaded.fc.bias.any()


@pytest.mark.parametrize(
    "small_stem, width, message",
    [
        (True, 64, "cannot export to torchvision resnet18: the backbone uses the small-image stem"),
        (False, 16, "cannot export to torchvision resnet18: the backbone uses width 16"),
        (True, 32, "small-image stem .* and width 32"),
    ],
)
def test_export_refuses_shapes_torchvision_cannot_load(small_stem, width, message):
    state_dict = build_backbone("resnet18", small_stem=small_stem, width=width).state_dict()
    with pytest.raises(ValueError, match=message) as error:
        export_backbone(state_dict)
    assert "\n" not in str(error.value)


def test_export_refuses_foreign_keys():
    prefixed = {f"module.{key}": tensor for key, tensor in build_backbone("resnet18", width=16).state_dict().items()}
    with pytest.raises(ValueError, match=r"not a torchvision-layout .* unexpected e\.g\. \['module\."):
        export_backbone(prefixed)
    with_fc = with_torchvision_fc(build_backbone("resnet18")).state_dict()
    with pytest.raises(ValueError, match=r"0 missing keys .* 2 unexpected e\.g\. \['fc\.bias', 'fc\.weight'\]"):
        export_backbone(with_fc)


def test_torchvision_initialization_and_zero_init_residual():
    torch.manual_seed(0)
    default = build_backbone("resnet50")
    conv = default.layer4[0].conv2  # fan_out = 512 * 3 * 3
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    assert all(default.layer1[0].bn3.weight == 1) and not default.layer1[0].bn3.bias.any()
    zero_init = build_backbone("resnet50", zero_init_residual=True)
    assert not zero_init.layer1[0].bn3.weight.any() and all(zero_init.layer1[0].bn2.weight == 1)
    assert not build_backbone("resnet18", zero_init_residual=True).layer2[1].bn2.weight.any()


def test_projection_head_shape_and_layers():
    head = ProjectionHead(in_dim=512, hidden_dim=2048)
    assert [type(layer) for layer in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 512)).shape == (5, 128)


def test_unknown_backbone_and_width_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'resnet34'"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match="width must be a positive int"):
        build_backbone("resnet18", width=0)


@pytest.mark.parametrize("options", [dict(momentum=0.9, weight_decay=1e-4), dict(momentum=0.0, weight_decay=0.0)])
def test_the_trainers_sgd_updates_and_saves_bitwise_as_torch_sgd(options):
    """model.step.SGD (torch.optim.SGD's methods without their compiler marks): three steps, a state_dict saved
    and loaded into a fresh optimizer, two more steps; the weights and the saved state bitwise torch's."""
    from model.step import SGD
    torch.manual_seed(0)
    start, gradients = torch.randn(50, 6), [torch.randn(50, 6) for _ in range(5)]
    results = {}
    for optimizer_class in (torch.optim.SGD, SGD):
        weight = nn.Parameter(start.clone())
        optimizer = optimizer_class([weight], lr=0.3, **options)
        for number, gradient in enumerate(gradients):
            if number == 3:
                saved = optimizer.state_dict()
                optimizer = optimizer_class([weight], lr=0.3, **options)
                optimizer.load_state_dict(saved)
            optimizer.zero_grad()
            weight.grad = gradient.clone()
            optimizer.step()
        results[optimizer_class] = weight.detach(), saved
    def plain(saved):  # the state dict with its tensors as lists: == compares every value exactly
        return saved["param_groups"], {key: {name: value.tolist() if torch.is_tensor(value) else value
                                             for name, value in state.items()} for key, state in saved["state"].items()}
    assert torch.equal(results[torch.optim.SGD][0], results[SGD][0])
    assert plain(results[SGD][1]) == plain(results[torch.optim.SGD][1])


def test_training_with_the_trainers_sgd_imports_no_compiler():
    """A fresh process that builds, steps, saves and loads model.step.SGD has not imported torch._dynamo (about
    1.5 s of CPU at every rank's start); torch.optim.SGD's step imports it, or the class has no reason to be."""
    script = """
import sys
import torch
from model.step import SGD
def train(optimizer_class):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_class([weight], lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer.zero_grad()
    weight.sum().backward()
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
    return "torch._dynamo" in sys.modules
print(train(SGD), train(torch.optim.SGD))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]
