"""Export a trained backbone as a torchvision ResNet state_dict.

`export_backbone` returns a dict that `torchvision.models.resnet18(num_classes=N)` / `resnet50(num_classes=N)`
loads with `strict=True`, so downstream tools (linear probes, detection fine-tuning) read our weights without
this project. Torchvision's ResNet always ends in `fc`, our backbone has none, so the export adds
`fc.weight` [N, C] and `fc.bias` [N] filled with zeros: a placeholder with no learned content (all logits 0) that
the downstream task trains or replaces. Zeros rather than nn.Linear's random init make the file deterministic
and impossible to mistake for a trained classifier.

Only width 64 with the standard 7x7 stem has torchvision's shapes; other backbones are refused with a one-line
ValueError rather than written as a file that would fail to load later.
"""

# Torchvision's layouts (block type, blocks per stage), restated here from its definition instead of imported from
# model/resnet.py: the target format must not be derived from the model it validates.
TORCHVISION_LAYOUTS = {18: ("BasicBlock", (2, 2, 2, 2)), 50: ("Bottleneck", (3, 4, 6, 3))}
TORCHVISION_WIDTH = 64
TORCHVISION_STEM_KERNEL = 7


def expected_torchvision_shapes(depth, num_classes=1000):
    """Key -> shape of torchvision's resnet{depth}(num_classes) state_dict, in its key order."""
    if depth not in TORCHVISION_LAYOUTS:
        raise ValueError(f"no torchvision layout for depth {depth!r}; known: {sorted(TORCHVISION_LAYOUTS)}")
    block_type, blocks_per_stage = TORCHVISION_LAYOUTS[depth]
    expansion = 4 if block_type == "Bottleneck" else 1
    shapes = {}

    def add_conv_bn(conv_key, bn_key, in_channels, out_channels, kernel_size):
        shapes[f"{conv_key}.weight"] = (out_channels, in_channels, kernel_size, kernel_size)
        for statistic in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn_key}.{statistic}"] = (out_channels,)
        shapes[f"{bn_key}.num_batches_tracked"] = ()

    add_conv_bn("conv1", "bn1", 3, TORCHVISION_WIDTH, TORCHVISION_STEM_KERNEL)
    in_channels = TORCHVISION_WIDTH
    for stage, num_blocks in enumerate(blocks_per_stage):
        planes = TORCHVISION_WIDTH * 2**stage
        for index in range(num_blocks):
            block = f"layer{stage + 1}.{index}"
            block_in = in_channels if index == 0 else planes * expansion
            stride = 2 if index == 0 and stage > 0 else 1
            if block_type == "Bottleneck":
                convs = [(block_in, planes, 1), (planes, planes, 3), (planes, planes * expansion, 1)]
            else:
                convs = [(block_in, planes, 3), (planes, planes, 3)]
            for number, conv in enumerate(convs, start=1):
                add_conv_bn(f"{block}.conv{number}", f"{block}.bn{number}", *conv)
            if stride != 1 or block_in != planes * expansion:  # the block changes shape: projected shortcut
                add_conv_bn(f"{block}.downsample.0", f"{block}.downsample.1", block_in, planes * expansion, 1)
        in_channels = planes * expansion
    shapes["fc.weight"] = (num_classes, in_channels)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def expected_torchvision_keys(depth):
    """Keys of torchvision's resnet{depth}() state_dict, in its order (fc included)."""
    return list(expected_torchvision_shapes(depth))


def torchvision_depth_of(backbone_state_dict):
    """Depth whose torchvision keys (minus fc) are exactly the given keys; ValueError naming the difference if none."""
    keys = set(backbone_state_dict)
    differences = {}
    for depth in TORCHVISION_LAYOUTS:
        expected = {key for key in expected_torchvision_keys(depth) if not key.startswith("fc.")}
        if keys == expected:
            return depth
        differences[depth] = (sorted(expected - keys), sorted(keys - expected))
    closest = min(differences, key=lambda depth: sum(map(len, differences[depth])))
    missing, unexpected = differences[closest]
    raise ValueError(
        f"not a torchvision-layout ResNet-18/50 backbone state_dict (closest: resnet{closest}, "
        f"{len(missing)} missing keys e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]})"
    )


def export_backbone(backbone_state_dict, num_classes=1000):
    """Backbone state_dict (no fc) -> torchvision resnet18/50 state_dict plus a zero fc; tensors shared, not copied."""
    depth = torchvision_depth_of(backbone_state_dict)
    stem_out, _, stem_kernel, _ = backbone_state_dict["conv1.weight"].shape
    problems = []
    if stem_kernel != TORCHVISION_STEM_KERNEL:
        problems.append(f"the small-image stem ({stem_kernel}x{stem_kernel} conv1, torchvision has 7x7)")
    if stem_out != TORCHVISION_WIDTH:
        problems.append(f"width {stem_out} (torchvision has {TORCHVISION_WIDTH})")
    if problems:
        raise ValueError(f"cannot export to torchvision resnet{depth}: the backbone uses {' and '.join(problems)}")

    expected_shapes = expected_torchvision_shapes(depth, num_classes)
    for key, tensor in backbone_state_dict.items():
        if tuple(tensor.shape) != expected_shapes[key]:
            expected = list(expected_shapes[key])
            raise ValueError(f"{key} has shape {list(tensor.shape)}, torchvision resnet{depth} has {expected}")

    exported = {key: backbone_state_dict[key] for key in expected_shapes if not key.startswith("fc.")}
    stem = backbone_state_dict["conv1.weight"]  # fc takes its dtype and device: one device in the whole dict
    exported["fc.weight"] = stem.new_zeros(expected_shapes["fc.weight"])  # [num_classes, feature_dim]
    exported["fc.bias"] = stem.new_zeros(expected_shapes["fc.bias"])  # [num_classes]
    return exported
