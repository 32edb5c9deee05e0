"""Write torchvision's resnet18/resnet50 reference fixtures from an unpacked torchvision wheel.

Usage (repository root): python tests/data/dump_torchvision_resnet_reference.py UNPACKED_WHEEL_DIR tests/data
- torchvision_resnet_keys.json: state_dict key -> shape (default arguments, so with the 1000-way fc).
- torchvision_resnet_features.json: pooled features (fc replaced by Identity) of each model in eval mode, with
  `fill_reference_weights` and `reference_images`, which tests/test_model.py applies to our models too.
Only torchvision/models/resnet.py is executed; the internals it imports (weights registry, presets, logging) are
stubbed because they do not affect the module structure or the forward pass.
"""
import enum
import importlib.util
import json
import sys
import types

import torch

FEATURES_KEPT = 16  # per image: enough to expose any difference in the forward pass, small enough to read


def fill_reference_weights(model):
    """Deterministic weights keyed by sorted state_dict name, so two models with equal keys get equal weights."""
    generator = torch.Generator().manual_seed(0)
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            tensor = state[key]
            if not tensor.is_floating_point():
                continue  # num_batches_tracked
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.dim() > 1:  # conv / linear: unit-variance outputs keep 50 layers of activations finite
                tensor.copy_(noise / tensor[0].numel() ** 0.5)
            elif key.endswith(("weight", "running_var")):  # BN scale and variance must stay positive
                tensor.copy_(torch.exp(0.2 * noise))
            else:  # BN bias and running_mean
                tensor.copy_(0.1 * noise)


def reference_images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]


def import_torchvision_resnet(unpacked_wheel):
    class WeightsEnum(enum.Enum):
        @classmethod
        def verify(cls, weights):
            return weights

    def stub_module(name, **attributes):
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attributes)
        sys.modules[name] = module

    for package in ("torchvision", "torchvision.models", "torchvision.transforms"):
        stub_module(package)
    stub_module("torchvision.transforms._presets", ImageClassification=object)
    stub_module("torchvision.utils", _log_api_usage_once=lambda obj: None)
    stub_module("torchvision.models._api", register_model=lambda name=None: (lambda f: f),
                Weights=lambda **fields: tuple(sorted(fields)), WeightsEnum=WeightsEnum)
    stub_module("torchvision.models._meta", _IMAGENET_CATEGORIES=[])
    stub_module("torchvision.models._utils", _ovewrite_named_param=None,
                handle_legacy_interface=lambda **kwargs: (lambda f: f))
    path = f"{unpacked_wheel}/torchvision/models/resnet.py"
    spec = importlib.util.spec_from_file_location("torchvision.models.resnet", path)
    resnet = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = resnet
    spec.loader.exec_module(resnet)
    return resnet


def main(unpacked_wheel, out_dir):
    resnet = import_torchvision_resnet(unpacked_wheel)
    key_blocks, features = [], {}
    for name in ("resnet18", "resnet50"):
        model = getattr(resnet, name)()
        print(name, "parameters:", sum(p.numel() for p in model.parameters()), file=sys.stderr)
        rows = [f'    "{key}": {json.dumps(list(value.shape))}' for key, value in model.state_dict().items()]
        key_blocks.append(f'  "{name}": {{\n' + ",\n".join(rows) + "\n  }")
        model.fc = torch.nn.Identity()  # our backbone has no fc; its keys must not shift the weight generator
        fill_reference_weights(model)
        with torch.no_grad():
            pooled = model.eval()(reference_images())  # [B, C]
        features[name] = {"first": pooled[:, :FEATURES_KEPT].tolist(), "norm": pooled.norm(dim=1).tolist()}
    with open(f"{out_dir}/torchvision_resnet_keys.json", "w") as keys_file:
        keys_file.write("{\n" + ",\n".join(key_blocks) + "\n}\n")
    with open(f"{out_dir}/torchvision_resnet_features.json", "w") as features_file:
        rows = [f'  "{name}": {json.dumps(values)}' for name, values in features.items()]
        features_file.write("{\n" + ",\n".join(rows) + "\n}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
