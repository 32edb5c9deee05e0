"""Print torchvision's resnet18/resnet50 state_dict key -> shape as JSON, from an unpacked torchvision wheel.

Only torchvision/models/resnet.py is executed; the internals it imports (weights registry, presets, logging)
are stubbed because they do not affect the module structure.
"""
import enum
import importlib.util
import json
import sys
import types


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
spec = importlib.util.spec_from_file_location("torchvision.models.resnet", sys.argv[1] + "/torchvision/models/resnet.py")
resnet = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = resnet
spec.loader.exec_module(resnet)

blocks = []
for name in ("resnet18", "resnet50"):
    model = getattr(resnet, name)()
    print(name, "parameters:", sum(p.numel() for p in model.parameters()), file=sys.stderr)
    rows = [f'    "{key}": {json.dumps(list(value.shape))}' for key, value in model.state_dict().items()]
    blocks.append(f'  "{name}": {{\n' + ",\n".join(rows) + "\n  }")
print("{\n" + ",\n".join(blocks) + "\n}")
